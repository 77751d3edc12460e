"""The GAD/MiniLLM judge protocol against a real HTTP server on 127.0.0.1 (retries, timeouts, bad
replies, the cache), a local judge through our sampler, and ROUGE-L."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sgalm_jax.errors import ConfigError, JudgeError
from sgalm_jax.evaluation.judge import Judge, JudgeItem, build_judge, parse_scores
from sgalm_jax.evaluation.judge_backends import OpenAIChatBackend, request_key
from sgalm_jax.evaluation.rouge import lcs_length, mean_rouge_l, rouge_l, rouge_score_tokens

REF_SCORE = 8


class FakeJudge:
    """An OpenAI-compatible chat-completions server with a scripted judge.

    Reference requests (not the scoring prompt) are answered ``"REF: <question>"``. Scoring requests get
    ``"<s1> <s2>"``: a reference answer scores 8, a student answer the N of its ``(score N)`` tag.
    ``faults`` are ``[marker, kind, times]``: the next ``times`` requests whose body contains
    ``marker`` get fault ``kind`` instead.
    """

    def __init__(self):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.faults: list[list] = []
        self.sleep = 0.6  # seconds a "timeout" fault waits before answering
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with judge.lock:
                    judge.requests.append(json.loads(body))
                    judge.headers.append(dict(self.headers))
                    fault = None
                    for rule in judge.faults:
                        if rule[0] in body.decode() and rule[2] > 0:
                            rule[2] -= 1
                            fault = rule[1]
                            break
                judge.respond(self, json.loads(body), fault)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @staticmethod
    def score(answer: str) -> int:
        if answer.startswith("REF:"):
            return REF_SCORE
        return int(re.search(r"\(score (\d+)\)", answer).group(1))

    def reply_text(self, messages) -> str:
        if not messages[0]["content"].startswith("You are a helpful and precise"):
            return "REF: " + messages[-1]["content"]
        text = messages[1]["content"]
        a1 = re.search(r"Assistant 1's Answer\]\n(.*?)\n\n\[The End", text, re.S).group(1)
        a2 = re.search(r"Assistant 2's Answer\]\n(.*?)\n\n\[The End", text, re.S).group(1)
        return f"{self.score(a1)} {self.score(a2)}\nBoth are fine; the explanation follows."

    def respond(self, handler, payload, fault):
        status, body, headers = 200, None, {}
        if fault == "timeout":
            time.sleep(self.sleep)
        elif fault in ("500", "503"):
            status, body = int(fault), b'{"error": "overloaded"}'
        elif fault == "429":
            status, body, headers = 429, b'{"error": "rate limited"}', {"Retry-After": "0"}
        elif fault == "401":
            status, body = 401, b'{"error": {"message": "invalid api key"}}'
        elif fault == "nonjson":
            body = b"<html>Bad Gateway</html>"
        elif fault == "nofields":
            body = json.dumps({"id": "x", "choices": []}).encode()
        content = {"badscore": "Both answers are great!\n", "range": "11 3\nwow"}.get(
            fault, None)
        if body is None:
            text = content if content is not None else self.reply_text(payload["messages"])
            body = json.dumps({"id": "c", "object": "chat.completion", "model": payload["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": text}}]
                               }).encode()
        try:
            handler.send_response(status)
            for k, v in headers.items():
                handler.send_header(k, v)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    s = FakeJudge()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("SGALM_TEST_JUDGE_KEY", "sk-test-123")


def backend(server, tmp_path, **kw):
    opts = dict(api_key_env="SGALM_TEST_JUDGE_KEY", timeout=5.0, max_retries=3, backoff=0.01,
                jitter=0.0, max_workers=4, cache_dir=tmp_path / "judge_cache")
    opts.update(kw)
    return OpenAIChatBackend(server.url, "judge-model", **opts)


ITEMS = [JudgeItem("q1", "Name a prime number.", "Seven (score 6)", teacher="Seven is prime."),
         JudgeItem("q2", ({"role": "system", "content": "Be terse."},
                          {"role": "user", "content": "What is 2+2?"}), "4 (score 9)",
                   teacher="2+2 = 4"),
         JudgeItem("q3", "Say hi.", "hello there (score 4)", teacher="Hi!")]
EXPECTED = [100 * 6 / 14, 100 * 9 / 17, 100 * 4 / 12]


def test_protocol_scores_cache_and_reuse_of_references(server, tmp_path):
    judge = Judge(backend(server, tmp_path))
    result = judge.evaluate(ITEMS, out_dir=tmp_path / "eval")
    m = result.metrics
    assert m["n"] == 3 and m["n_scored"] == 3 and m["n_failed"] == 0
    assert m["judge_score"] == pytest.approx(sum(EXPECTED) / 3)
    assert m["judge_score_of_sums"] == pytest.approx(100 * 19 / (19 + 24))
    assert m["student_score"] == pytest.approx(19 / 3) and m["reference_score"] == REF_SCORE
    assert m["rouge_l"] == pytest.approx(sum(rouge_l(i.answer, i.teacher).fmeasure
                                             for i in ITEMS) / 3)
    assert [r["reference"] for r in result.records] == [
        "REF: Name a prime number.", "REF: What is 2+2?", "REF: Say hi."]
    assert [r["ratio"] for r in result.records] == pytest.approx(EXPECTED)
    assert (tmp_path / "eval" / "judge_summary.json").exists()
    # What went over the wire: 3 references (the item's own turns) + 3 scoring prompts.
    assert len(server.requests) == 6 and judge.backend.num_requests == 6
    assert {h["Authorization"] for h in server.headers} == {"Bearer sk-test-123"}
    ref_req = next(r for r in server.requests if r["messages"][-1]["content"] == "What is 2+2?")
    assert ref_req["messages"][0] == {"role": "system", "content": "Be terse."}
    assert ref_req["model"] == "judge-model" and ref_req["temperature"] == 0.0
    scoring = [r["messages"][1]["content"] for r in server.requests
               if r["messages"][0]["role"] == "system" and len(r["messages"]) == 2
               and r["messages"][0]["content"].startswith("You are a helpful and precise")]
    assert len(scoring) == 3
    for it in ITEMS:  # the student is Assistant 1, the judge's own reference Assistant 2
        (text,) = [t for t in scoring if it.answer in t]
        assert text.index(it.answer) < text.index("REF: ") < text.index("[System]")
    # A rerun pays nothing: every answer comes from the cache in the run directory.
    again = Judge(backend(server, tmp_path)).evaluate(ITEMS)
    assert len(server.requests) == 6 and again.metrics["judge_score"] == m["judge_score"]
    # The next checkpoint's answers reuse the judge's reference answers: 3 scoring requests only.
    newer = [JudgeItem(i.id, i.prompt, i.answer + " more", i.teacher) for i in ITEMS]
    Judge(backend(server, tmp_path)).evaluate(newer)
    assert len(server.requests) == 9


def test_both_orders_undoes_the_swap(server, tmp_path):
    result = Judge(backend(server, tmp_path), both_orders=True).evaluate(ITEMS[:2])
    assert [r["ratio"] for r in result.records] == pytest.approx(EXPECTED[:2])
    assert len(server.requests) == 2 + 4
    swapped = [r for r in server.requests if "Assistant 1's Answer]\nREF:" in r["messages"][-1]["content"]]
    assert len(swapped) == 2


def test_retries_on_5xx_429_and_timeout_then_succeeds(server, tmp_path):
    server.faults = [["Name a prime", "500", 2], ["What is 2+2", "429", 1],
                     ["Say hi", "timeout", 1]]
    server.sleep = 2.0  # a 1 s client timeout: ordinary replies never come near it
    judge = Judge(backend(server, tmp_path, timeout=1.0))
    result = judge.evaluate(ITEMS)
    assert result.metrics["judge_score"] == pytest.approx(sum(EXPECTED) / 3)
    # q1 is in both its reference and scoring bodies: 2 failures; q2 1; q3 1 (timed out)
    assert judge.backend.num_requests == 6 + 2 + 1 + 1


def test_persistent_failures_name_the_item(server, tmp_path):
    server.faults = [["Say hi", "503", 99]]
    with pytest.raises(JudgeError, match=r"'q3'.*failed after 3 attempts; last error: HTTP 503"):
        Judge(backend(server, tmp_path, max_retries=2)).evaluate(ITEMS)
    # every other request ran to the end and was cached before the error was raised
    server.faults = []
    n = len(server.requests)
    Judge(backend(server, tmp_path)).evaluate(ITEMS)
    assert len(server.requests) - n == 2  # q3's reference and scoring only
    server.faults = [["Say hi", "timeout", 99]]
    with pytest.raises(JudgeError, match=r"'q3'.*failed after 2 attempts; last error: .*timed out"):
        Judge(backend(server, tmp_path / "fresh", timeout=0.2, max_retries=1)).evaluate(ITEMS[2:])


def test_connection_refused_is_retried_then_named(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    b = OpenAIChatBackend(f"http://127.0.0.1:{port}/v1", "m", api_key_env=None, max_retries=1,
                          backoff=0.01)
    with pytest.raises(JudgeError, match=r"'q1'.*failed after 2 attempts.*(refused|URLError)"):
        Judge(b).evaluate(ITEMS[:1])
    assert b.num_requests == 2


@pytest.mark.parametrize("fault,message", [
    ("nonjson", "is not JSON: '<html>Bad Gateway</html>'"),
    ("nofields", r"has no choices\[0\]\.message\.content"),
    ("badscore", "cannot read two scores from the first line 'Both answers are great!'"),
    ("range", "scores 11 and 3 are not on the 1-10 scale"),
    ("401", "answered HTTP 401: .*invalid api key"),
])
def test_bad_replies_are_errors_naming_the_item(server, tmp_path, fault, message):
    marker = "Assistant 1's Answer]\\nSeven"  # q1's scoring request only (JSON-escaped newline)
    server.faults = [[marker, fault, 99]]
    with pytest.raises(JudgeError, match=rf"judge item 'q1': .*{message}"):
        Judge(backend(server, tmp_path)).evaluate(ITEMS)
    hits = [r for r in server.requests if "Seven (score 6)" in json.dumps(r)]
    assert len(hits) == 1  # never retried: a malformed reply is not a transient failure
    # on_error="skip": q1 is reported failed, the others scored, and nothing is lost
    result = Judge(backend(server, tmp_path), on_error="skip").evaluate(ITEMS)
    assert result.metrics["n_failed"] == 1 and result.metrics["n_scored"] == 2
    assert result.metrics["judge_score"] == pytest.approx(sum(EXPECTED[1:]) / 2)
    assert re.search(rf"'q1': .*{message}", result.records[0]["error"])
    # the bad reply was not cached: once the server is fixed, only q1's scoring is asked again
    server.faults = []
    n = len(server.requests)
    fixed = Judge(backend(server, tmp_path)).evaluate(ITEMS)
    assert len(server.requests) - n == 1 and fixed.metrics["n_failed"] == 0


def test_config_errors_name_the_key(tmp_path, monkeypatch, server):
    monkeypatch.delenv("SGALM_TEST_JUDGE_KEY")
    with pytest.raises(ConfigError, match="SGALM_TEST_JUDGE_KEY"):
        build_judge({"base_url": server.url, "model": "m", "api_key_env": "SGALM_TEST_JUDGE_KEY"})
    with pytest.raises(ConfigError, match="judge.base_url"):
        build_judge({"model": "m", "api_key_env": None})
    with pytest.raises(ConfigError, match="judge.temprature: unknown key"):
        build_judge({"base_url": server.url, "model": "m", "api_key_env": None, "temprature": 0})
    with pytest.raises(ConfigError, match="judge.backend"):
        build_judge({"backend": "vllm"})
    with pytest.raises(ConfigError, match="judge.path"):
        build_judge({"backend": "local"})
    judge = build_judge({"base_url": server.url, "model": "m", "api_key_env": None,
                         "max_retries": 0, "both_orders": True}, run_dir=tmp_path)
    assert judge.backend.cache.directory == str(tmp_path / "judge_cache") and judge.both_orders


def test_parse_scores_and_cache_key():
    assert parse_scores("8 7\nbecause") == (8.0, 7.0)
    assert parse_scores("\n\n**7.5, 6**\nx") == (7.5, 6.0)
    assert parse_scores("Assistant 1: 9  Assistant 2: 10") == (9.0, 10.0)
    for bad in ("", "8\n7", "8 7 6", "score: great", "0 0"):
        with pytest.raises(JudgeError, match="item 'z'"):
            parse_scores(bad, "z")
    msgs = [{"role": "user", "content": "hi"}]
    assert request_key("m", msgs, {"temperature": 0}) == request_key("m", msgs, {"temperature": 0})
    assert request_key("m", msgs, {"temperature": 0}) != request_key("m", msgs, {"temperature": 1})
    assert request_key("m", msgs, {}) != request_key("m2", msgs, {})


# --------------------------------------------------------------------------------- local judge
def test_local_judge_through_our_sampler(tmp_path):
    """A local 'judge' whose greedy continuation of any ChatML prompt is "8 6": a one-layer model
    whose attention and MLP weights are zero, so the next token is a fixed function of the last
    one ("\\n" -> "8" -> " 6" -> <|im_end|>); the protocol then gives 100 * 8 / 14."""
    import numpy as np
    from flax import nnx

    from sgalm_jax.evaluation.judge_backends import LocalChatBackend
    from sgalm_jax.models import CausalLM, ModelConfig
    from sgalm_jax.training.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    nl, eight, six = (tok(t, add_special_tokens=False)["input_ids"][-1] for t in ("\n", "8", " 6"))
    eos = tok.eos_token_id
    config = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, attention_bias=False, tie_word_embeddings=False,
                         eos_token_id=eos)
    # Norm weights 1, every other weight 0 (so each layer adds nothing), then the token chain.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0))))
    flat = {path: var.replace((np.ones if path[-1] == "weight" else np.zeros)(
        var.get_value().shape, np.float32)) for path, var in nnx.to_flat_state(state)}
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    emb = np.zeros((config.vocab_size, 64), np.float32)
    head = np.zeros((64, config.vocab_size), np.float32)
    for k, (src, dst) in enumerate([(nl, eight), (eight, six), (six, eos)]):
        emb[src, k] = 1.0
        head[k, dst] = 10.0
    model.model.embed_tokens.embedding[...] = emb
    model.lm_head.kernel[...] = head

    short = {"temperature": 0.0, "max_tokens": 6}  # one bucket for both calls: one compilation
    judge = Judge(LocalChatBackend(model, tok, name="tiny-judge", cache_dir=tmp_path / "cache",
                                   min_prompt_bucket=1024),
                  reference_params=short, scoring_params=short)
    items = [JudgeItem("a", "What is 2+2?", "4"), JudgeItem("b", "Name a colour.", "blue")]
    result = judge.evaluate(items)
    assert [r["reference"] for r in result.records] == ["8 6", "8 6"]
    assert [(r["student_score"], r["reference_score"]) for r in result.records] == [(8, 6)] * 2
    assert result.metrics["judge_score"] == pytest.approx(100 * 8 / 14)
    again = Judge(LocalChatBackend(model, tok, name="tiny-judge", cache_dir=tmp_path / "cache"),
                  reference_params=short, scoring_params=short)
    assert again.evaluate(items).metrics == result.metrics
    assert again.backend.cache.hits == 4


# ------------------------------------------------------------------------------------ ROUGE-L
def test_rouge_l_hand_computed_cases():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5: P = 5/5, R = 5/6
    s = rouge_l("The cat on the mat.", "the cat sat on the mat")
    assert (s.precision, s.recall) == (1.0, 5 / 6) and s.fmeasure == pytest.approx(2 * 5 / 11)
    # rouge_score tokenisation: punctuation and case are separators, not tokens
    assert rouge_score_tokens("Hello, World! It's 2024.") == ["hello", "world", "it", "s", "2024"]
    assert rouge_l("a b c d", "d c b a").fmeasure == pytest.approx(2 * 1 / 8)
    assert rouge_l("", "x").fmeasure == 0.0 and rouge_l("x y", "z").fmeasure == 0.0
    # the "words" tokenizer keeps punctuation (SGALM's diagnostics): 4 and 3 tokens, LCS 3
    assert rouge_l("hi, you!", "hi you!", tokenizer="words").fmeasure == pytest.approx(6 / 7)
    assert rouge_l("hi, you!", "hi you!").fmeasure == 1.0
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # CLRS's example
    assert mean_rouge_l(["a b", "c"], ["a b", "d"]) == pytest.approx(0.5)
    try:
        from rouge_score import rouge_scorer  # only when installed
    except ImportError:
        return
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for p, r in [("The cat on the mat.", "the cat sat on the mat"), ("x y z", "z y x w")]:
        assert rouge_l(p, r).fmeasure == pytest.approx(scorer.score(r, p)["rougeL"].fmeasure)
