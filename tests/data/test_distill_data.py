"""Distillation data (GAD / SeqKD): LMSYS-GPT-5 and prompt/response layouts, bad rows, and the
teacher/student token rule, on real data (Self-Instruct's text-davinci-003 responses, a black-box
teacher) and the real Qwen2.5 tokenizer."""

from __future__ import annotations

import copy
import json

import pytest

from sgalm_jax.data import get_task
from sgalm_jax.data.distill_tokens import DistillEncoder
from sgalm_jax.errors import ConfigError, DataError
from sgalm_jax.training.tokenizer import CHATML_TEMPLATE

IM_END, ENDOFTEXT = 151645, 151643


@pytest.fixture(scope="module")
def davinci_rows(shared_data):
    path = shared_data / "self_instruct" / "user_oriented_text-davinci-003_predictions.jsonl"
    return path, [json.loads(line) for line in path.open()]


@pytest.fixture(scope="module")
def qwen(qwen_tokenizer):
    tok = copy.copy(qwen_tokenizer)  # the session fixture stays template-free
    tok.chat_template = CHATML_TEMPLATE  # Qwen2.5-Instruct's ChatML (none ships here)
    return tok


def _lmsys_rows(rows, n=12):
    """Rows in the LMSYS-Chat-GPT-5-Chat-Response layout, built from real teacher responses:
    ``content`` alternates between a chat-message list (one with a system turn) and a string."""
    out = []
    for k, r in enumerate(rows[:n]):
        if k % 3 == 0:
            content = r["prompt"]
        elif k % 3 == 1:
            content = [{"role": "user", "content": r["prompt"]}]
        else:
            content = [{"role": "system", "content": "You are a helpful assistant."},
                       {"role": "user", "content": r["prompt"]}]
        out.append({"id": f"si-{k}", "content": content, "teacher_response": r["response"],
                    "category": "self_instruct"})
    return out


def test_lmsys_layout_from_jsonl_and_parquet(davinci_rows, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, rows = davinci_rows
    lmsys = _lmsys_rows(rows)
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in lmsys))
    # parquet wants one type per column: the layout of export_lmsys_parquet (message lists)
    as_lists = [dict(r, content=r["content"] if isinstance(r["content"], list)
                     else [{"role": "user", "content": r["content"]}]) for r in lmsys]
    pq.write_table(pa.Table.from_pylist(as_lists), tmp_path / "test.parquet")
    for split in ("train", "test"):
        exs = get_task("lmsys_gpt5_chat", source=tmp_path).load(split)
        assert len(exs) == 12
        for ex, src, raw in zip(exs, lmsys, rows):
            assert ex.id == src["id"] and ex.answer == src["teacher_response"] == raw["response"]
            assert ex.question == raw["prompt"]
            msgs = ex.fields["messages"]
            assert msgs[-1] == {"role": "assistant", "content": raw["response"]}
            assert msgs[-2] == {"role": "user", "content": raw["prompt"]}
        assert exs[2].fields["messages"][0]["role"] == "system"


def test_plain_prompt_response_file_with_default_and_configured_keys(davinci_rows):
    path, rows = davinci_rows
    exs = get_task("distill", source=path).load("train")
    assert len(exs) == 252
    assert [e.answer for e in exs] == [r["response"] for r in rows]
    assert exs[5].question == rows[5]["prompt"]
    # The same file with the human-written targets as the "teacher" and the instruction as prompt.
    human = get_task("distill", source=path, prompt_key="instruction", response_key="target")
    exs = human.load("train")
    assert [e.answer for e in exs] == [r["target"] for r in rows]
    assert exs[0].question == rows[0]["instruction"]


BAD_ROWS = [
    ('{"content": "hi", "teacher_response": "ok"', "invalid JSON"),
    ('{"content": 42, "teacher_response": "ok"}', "'content' must be a string or a non-empty list"),
    ('{"content": [{"content": "hi"}], "teacher_response": "ok"}', "unknown role None"),
    ('{"content": [{"role": "user", "content": 7}], "teacher_response": "ok"}', "no string content"),
    ('{"content": "hi"}', "no teacher response"),
    ('{"content": "hi", "teacher_response": "   "}', "teacher response 'teacher_response' is empty"),
    ('{"content": "hi", "teacher_response": ["ok"]}', "must be a string, got list"),
    ('{"content": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}], '
     '"teacher_response": "ok"}', "must end with a user turn"),
    ('{"question": "hi", "answer": "ok"}', "no prompt field"),
]


@pytest.mark.parametrize("line,reason", BAD_ROWS)
def test_malformed_row_is_a_data_error_naming_file_and_line(tmp_path, line, reason, davinci_rows):
    good = json.dumps(_lmsys_rows(davinci_rows[1], 1)[0])
    path = tmp_path / "train.jsonl"
    path.write_text(f"{good}\n{good}\n{line}\n{good}\n")
    with pytest.raises(DataError) as err:
        get_task("lmsys_gpt5_chat", source=path).load("train")
    assert f"{path}:3" in str(err.value) and reason in str(err.value)
    report = get_task("lmsys_gpt5_chat", source=path, skip_malformed=True).load_split("train")
    assert len(report.examples) == 3 and report.skipped == 1


def test_configured_key_missing_and_assistant_last_turn(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "reply": "ok"}) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: .*missing response field 'answer'"):
        get_task("distill", source=path, response_key="answer").load("train")
    # A chat record whose last turn is the assistant's supplies the teacher response.
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello!"}]}) + "\n")
    (ex,) = get_task("distill", source=path).load("train")
    assert ex.answer == "hello!" and ex.question == "hi"


def test_hub_failure_names_the_dataset():
    with pytest.raises(DataError, match="ytz20/LMSYS-Chat-GPT-5-Chat-Response"):
        get_task("lmsys_gpt5_chat").load("test")


# ------------------------------------------------------------------------- tokenization rule
def test_identical_text_gets_identical_ids_as_teacher_or_student(qwen, davinci_rows):
    _, rows = davinci_rows
    enc = DistillEncoder(qwen, stop_token_ids=(IM_END, ENDOFTEXT))
    assert enc.end_token_id == IM_END and enc.stop_token_ids == (ENDOFTEXT, IM_END)
    assert enc.sampler_kwargs == {"max_new_tokens": 1536, "stop_token_ids": (ENDOFTEXT, IM_END)}
    for r in rows:
        text = r["response"]
        teacher, cut = enc.teacher_response_ids(text)
        assert not cut and teacher[-1] == IM_END and teacher.count(IM_END) == 1
        assert qwen.decode(teacher[:-1]) == text.strip()
        content = qwen(text.strip(), add_special_tokens=False)["input_ids"]
        # what the sampler returns for a student that wrote this text: stop token included
        for stop in (IM_END, ENDOFTEXT):
            student, s_cut = enc.student_response_ids(content + [stop])
            assert student == teacher and not s_cut
        assert enc.student_response_ids(content + [IM_END, 11, 12])[0] == teacher


def test_truncated_responses_end_identically(qwen, davinci_rows):
    _, rows = davinci_rows
    cap = 16
    enc = DistillEncoder(qwen, max_response_tokens=cap)
    text = max((r["response"] for r in rows), key=len)
    content = qwen(text.strip(), add_special_tokens=False)["input_ids"]
    teacher, cut = enc.teacher_response_ids(text)
    assert cut and teacher == content[:cap] and IM_END not in teacher
    # a student rollout that hit max_new_tokens = cap without stopping
    assert enc.student_response_ids(content[:cap]) == (teacher, True)
    # exactly cap-1 content tokens still fit with the end token; cap content tokens do not
    assert enc._finish(content[:cap - 1]) == (content[:cap - 1] + [IM_END], False)
    assert enc._finish(content[:cap]) == (content[:cap], True)


def test_prompt_ids_match_the_sampler_and_truncate_inside_the_last_turn(qwen, davinci_rows):
    _, rows = davinci_rows
    enc = DistillEncoder(qwen, max_prompt_tokens=2048)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": rows[1]["prompt"]}]
    ids, cut = enc.prompt_ids(msgs)
    text = qwen.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert not cut and ids == qwen(text, add_special_tokens=False)["input_ids"]  # generate_text's ids
    long_msgs = [msgs[0], {"role": "user", "content": " ".join(r["prompt"] for r in rows[:20])}]
    full = qwen(qwen.apply_chat_template(long_msgs, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"]
    limit = 128
    assert len(full) > limit
    header = qwen("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    ids, cut = DistillEncoder(qwen, max_prompt_tokens=limit).prompt_ids(long_msgs)
    assert cut and len(ids) == limit
    assert ids[-len(header):] == header and ids[:12] == full[:12]  # template kept whole
    assert qwen.decode(ids).count("<|im_start|>") == 3
    right, _ = DistillEncoder(qwen, max_prompt_tokens=limit, prompt_truncation="right").prompt_ids(
        long_msgs)
    left, _ = DistillEncoder(qwen, max_prompt_tokens=limit, prompt_truncation="left").prompt_ids(
        long_msgs)
    assert right == full[:limit] and left == full[-limit:]
    with pytest.raises(DataError, match="more than max_prompt_tokens=128"):
        DistillEncoder(qwen, max_prompt_tokens=limit, prompt_truncation="error").prompt_ids(long_msgs)
    # a system turn that alone overflows the cap: keep the end (the assistant header survives)
    huge = [{"role": "system", "content": long_msgs[1]["content"]}, {"role": "user", "content": "hi"}]
    ids, cut = DistillEncoder(qwen, max_prompt_tokens=limit).prompt_ids(huge)
    assert cut and len(ids) == limit and ids[-len(header):] == header


def test_encode_many_equals_one_by_one_and_tokenized_masks_the_response(qwen, davinci_rows):
    path, _ = davinci_rows
    exs = get_task("distill", source=path).load("train")
    enc = DistillEncoder(qwen, max_prompt_tokens=96, max_response_tokens=64)
    many = enc.encode_many(exs)
    assert many == [enc.encode_teacher(e) for e in exs]
    assert any(p.prompt_truncated for p in many) and any(p.response_truncated for p in many)
    pair = many[0]
    tok = pair.tokenized()
    assert tok.input_ids.tolist() == pair.prompt_ids + pair.response_ids
    assert tok.loss_mask.sum() == len(pair.response_ids) and tok.loss_mask[:len(pair.prompt_ids)].sum() == 0


def test_encoder_config_errors(qwen, qwen_tokenizer):
    with pytest.raises(ConfigError, match="prompt_truncation"):
        DistillEncoder(qwen, prompt_truncation="middle")
    bare = qwen_tokenizer
    with pytest.raises(ConfigError, match="no chat template"):
        DistillEncoder(bare)
    plain = DistillEncoder(bare, chat_template=False)
    ids, _ = plain.prompt_ids([{"role": "user", "content": "What is 2+2?"}])
    assert bare.decode(ids) == "User: What is 2+2?\nAssistant:"
