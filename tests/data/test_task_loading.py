"""Loading tasks from local files and (mocked) hub, malformed-record handling, the registry."""

from __future__ import annotations

import json

import pytest

from sgalm_jax.data import (
    ARCTask,
    ChatTask,
    GSM8KTask,
    MBPPTask,
    extract_code,
    get_task,
    list_tasks,
)
from sgalm_jax.data.arc import gold_index
from sgalm_jax.errors import DataError, SgalmError


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"question": "What is 2+3?", "answer": "2+3=<<2+3=5>>5\n#### 5"})


# ---------------------------------------------------------------------------------- registry
def test_registry_names_and_unknown():
    names = list_tasks()
    for n in ("gsm8k", "arc_challenge", "mbpp", "mbpp_sanitized", "arithmetic", "chat", "alpaca", "ultrachat"):
        assert n in names
    assert isinstance(get_task("ARC-Challenge"), ARCTask)
    assert get_task("mbpp_sanitized").sanitized
    with pytest.raises(DataError, match="unknown task"):
        get_task("no_such_task")


def test_missing_local_path_is_an_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        GSM8KTask(str(tmp_path / "nope.jsonl"))


# ------------------------------------------------------------------------- malformed records
def test_malformed_json_line_names_file_and_line(tmp_path):
    f = _write_jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, '{"question": "x", "answer": ', GOOD])
    with pytest.raises(DataError) as e:
        GSM8KTask(str(f)).load("train")
    assert f"{f}:3" in str(e.value) and "invalid JSON" in str(e.value)


def test_missing_field_names_file_and_line(tmp_path):
    f = _write_jsonl(tmp_path / "train.jsonl", [GOOD, json.dumps({"question": "no answer"}), GOOD])
    with pytest.raises(DataError, match=rf"{f}:2: .*missing field 'answer'"):
        GSM8KTask(str(f)).load("train")
    f2 = _write_jsonl(tmp_path / "t2.jsonl", [GOOD, json.dumps({"question": "q", "answer": "no final"})])
    with pytest.raises(DataError, match=rf"{f2}:2: .*####"):
        GSM8KTask(str(f2)).load("train")


def test_skip_malformed_counts_and_reports(tmp_path, caplog):
    f = _write_jsonl(tmp_path / "train.jsonl", [GOOD, "not json", json.dumps([1, 2]), GOOD, json.dumps({"answer": "x"})])
    task = GSM8KTask(str(f), skip_malformed=True)
    report = task.load_split("train")
    assert len(report.examples) == 2
    assert report.skipped == 3
    assert [r.split(": ")[0] for r in report.skip_reasons] == [f"{f}:2", f"{f}:3", f"{f}:5"]
    assert "skipped 3 malformed" in caplog.text
    assert len(task.load("train")) == 2 and task.last_skipped == 3


def test_json_array_errors_name_line(tmp_path):
    f = tmp_path / "data.json"
    f.write_text('[\n  {"question": "a", "answer": "#### 1"},\n  {"question": "b"}\n]\n')
    with pytest.raises(DataError, match=rf"{f}:3:"):
        GSM8KTask(str(f)).load("test")
    f.write_text('[\n  {"question": "a", "answer": "#### 1"},\n  {"question": "b", \n]\n')
    with pytest.raises(DataError, match=rf"{f}:\d+: invalid JSON"):
        GSM8KTask(str(f)).load("test")


def test_undecodable_and_folder_data_files_are_named(tmp_path):
    """Bytes that are not UTF-8 name the file, line and column; a folder given as a data file is
    said to be a folder (not "not found")."""
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(GOOD.encode() + b"\n" + '{"question": "caf\u00e9", "answer": "#### 1"}'.encode("latin-1")
                  + b"\n")
    with pytest.raises(DataError, match=rf"^{f}:2: column 18, not UTF-8 text \(byte 0xe9"):
        GSM8KTask(str(f)).load("train")
    j = tmp_path / "latin1.json"
    j.write_bytes(b'[\n {"question": "a", "answer": "#### 1"},\n {"question": "\xff"}\n]\n')
    with pytest.raises(DataError, match=rf"^{j}:3: not UTF-8 text"):
        GSM8KTask(str(j)).load("train")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\n")  # a UTF-8 BOM is fine
    assert len(GSM8KTask(str(bom)).load("train")) == 1
    folder = tmp_path / "train.jsonl.d"
    folder.mkdir()
    with pytest.raises(DataError, match=rf"^{folder}: is a folder, not a data file"):
        GSM8KTask(data_files={"train": str(folder)}).load("train")


def test_parquet_and_directory_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    d = tmp_path / "gsm"
    d.mkdir()
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(3)] + [{"question": "bad", "answer": "none"}]
    pq.write_table(pa.Table.from_pylist(rows), d / "test-00000-of-00001.parquet")
    _write_jsonl(d / "train.jsonl", [GOOD])
    task = GSM8KTask(str(d), skip_malformed=True)
    rep = task.load_split("test")
    assert [e.target for e in rep.examples] == ["0", "1", "2"]
    assert rep.skipped == 1 and "row 3" in rep.skip_reasons[0]
    assert len(task.load("train")) == 1
    with pytest.raises(DataError, match="no file for split 'validation'"):
        task.load("validation")
    assert len(GSM8KTask(data_files={"test": d / "train.jsonl"}).load("test")) == 1


def test_hub_loading_is_mocked(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config=None, split=None, **kw):
        calls.append((name, config, split))
        return [{"question": "q", "answer": "#### 7"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ex = GSM8KTask().load("test")
    assert ex[0].target == "7" and calls[-1] == ("openai/gsm8k", "main", "test")

    def offline(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"openai/gsm8k/main\[test\].*offline"):
        GSM8KTask().load("test")
    with pytest.raises(SgalmError):
        ARCTask().load("test")


# --------------------------------------------------------------------------------- real data
def test_gsm8k_local(shared_data):
    task = get_task("gsm8k", source=shared_data / "gsm8k")
    test, train = task.load("test"), task.load("train")
    assert len(test) == 1319 and len(train) == 7473
    assert test[0].target == "18"
    p, r = task.format_sample(test[0])
    assert p.startswith("Question: Janet") and p.endswith("Answer:") and r.strip().endswith("#### 18")


def test_arc_local_and_formatting(shared_data):
    task = ARCTask(shared_data / "arc_challenge")
    sizes = {s: len(task.load(s)) for s in ("train", "validation", "test")}
    assert sizes == {"train": 1056, "validation": 294, "test": 1172}
    by_n = {}
    for ex in task.load("test"):
        by_n.setdefault(len(ex.fields["choices"]), ex)
    assert set(by_n) == {3, 4, 5}
    for n, ex in by_n.items():
        prompt = task.format_prompt(ex)
        lines = prompt.splitlines()
        assert lines[0].startswith("Question: ") and lines[-1] == "Answer:"
        assert [ln[:3] for ln in lines[1:-1]] == [f"{c}. " for c in "ABCDE"[:n]]
        assert task.format_target(ex) == " " + "ABCDE"[ex.target]
        assert task.check_answer(ex, task.format_target(ex))
    cloze = ARCTask(shared_data / "arc_challenge", style="cloze")
    ex = by_n[4]
    assert cloze.format_prompt(ex) == f"Question: {ex.question}\nAnswer:"
    assert cloze.loglik_requests(ex, "CTX") == [("CTX", " " + c) for c in ex.fields["choices"]]


def test_arc_numeric_labels():
    rec = {"id": "x", "question": "Pick two.", "choices": {"text": ["one", "two", "three"], "label": ["1", "2", "3"]}, "answerKey": "2"}
    task = ARCTask()
    ex = task.parse_record(rec, index=0, split="test")
    assert ex.target == 1 and ex.answer == "two"
    assert task.format_prompt(ex).splitlines()[1:4] == ["A. one", "B. two", "C. three"]
    assert task.check_answer(ex, " B") and task.check_answer(ex, "2") and not task.check_answer(ex, " A")
    assert task.check_answer(ex, "The answer is (B).") and task.check_answer(ex, "two")
    raw = ARCTask(letter_labels=False)
    assert raw.format_prompt(ex).splitlines()[1] == "1. one" and raw.format_target(ex) == " 2"
    five = dict(rec, choices={"text": list("vwxyz"), "label": list("12345")}, answerKey="5")
    assert task.parse_record(five, index=0, split="t").target == 4
    assert gold_index(["A", "B", "C", "D"], "3") == 2 and gold_index(["1", "2", "3"], "B") == 1
    assert gold_index(["A", "B"], "Z") is None
    with pytest.raises(DataError, match="answerKey"):
        task.parse_record(dict(rec, answerKey="9"), index=0, split="t")


def test_mbpp_local_splits_and_programs(shared_data):
    full = get_task("mbpp", source=shared_data / "mbpp" / "mbpp.jsonl")
    assert {s: len(full.load(s)) for s in ("prompt", "train", "validation", "test")} == {"prompt": 10, "train": 374, "validation": 90, "test": 500}
    san = get_task("mbpp_sanitized", source=shared_data / "mbpp" / "sanitized-mbpp.json")
    assert {s: len(san.load(s)) for s in ("prompt", "train", "validation", "test")} == {"prompt": 7, "train": 120, "validation": 43, "test": 257}
    ex = full.load("test")[0]
    assert ex.id == "11" and "\r" not in ex.answer
    prompt = full.format_prompt(ex)
    assert prompt.startswith("You are an expert Python programmer") and prompt.endswith("[BEGIN]\n")
    assert all(t in prompt for t in ex.target)
    program, tests = full.build_program(ex, full.format_target(ex))
    assert "[DONE]" not in program and tests.strip().splitlines() == ex.target
    setup_ex = next(e for e in full.load("test") if e.fields["test_setup_code"])
    assert full.build_program(setup_ex, setup_ex.answer)[1].startswith(setup_ex.fields["test_setup_code"])


def test_extract_code_variants():
    assert extract_code("def f():\n    return 1\n[DONE] junk") == "def f():\n    return 1"
    assert extract_code("Here:\n```python\ndef f():\n    return 2\n```\nmore") == "def f():\n    return 2"
    assert extract_code("[BEGIN]\nx = 1\n[DONE]") == "x = 1"
    assert extract_code("```\ny = 3\n") == "y = 3"


def test_mbpp_malformed(tmp_path):
    f = _write_jsonl(tmp_path / "mbpp.jsonl", [json.dumps({"task_id": 11, "text": "t", "code": "x=1", "test_list": "assert x"})])
    with pytest.raises(DataError, match=rf"{f}:1: .*test_list"):
        MBPPTask(str(f)).load("test")


def test_chat_layouts(tmp_path, shared_data):
    recs = [
        {"prompt": "Hi", "response": "Hello!"},
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
                      {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
                      {"role": "assistant", "content": "A2"}]},
        {"conversations": [{"from": "human", "value": "yo"}, {"from": "gpt", "value": "hey"}]},
    ]
    f = _write_jsonl(tmp_path / "train.jsonl", [json.dumps(r) for r in recs])
    task = ChatTask(str(f))
    ex = task.load("train")
    assert [e.answer for e in ex] == ["Hello!", "5", "A2", "hey"]
    assert task.format_prompt(ex[0]) == "User: Hi\nAssistant:"
    assert "### Input:\n2 and 3" in task.format_prompt(ex[1]) and task.format_target(ex[1]) == "5"
    assert task.context_messages(ex[2])[-1] == {"role": "user", "content": "Q2"} and len(task.context_messages(ex[2])) == 4
    assert ex[3].fields["messages"][0]["role"] == "user"
    bad = _write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"prompt": "no reply"})])
    with pytest.raises(DataError, match=rf"{bad}:1: .*no final assistant"):
        ChatTask(str(bad)).load("train")
    assert len(ChatTask(str(bad), require_response=False).load("train")) == 1
    seeds = ChatTask(shared_data / "self_instruct" / "seed_tasks.jsonl").load("train")
    assert len(seeds) == 175 and all(e.answer for e in seeds)
    vicuna = ChatTask(shared_data / "vicuna" / "question.jsonl", require_response=False).load("test")
    assert len(vicuna) == 80 and vicuna[0].answer == ""
    assert get_task("ultrachat").hub_split_name("train") == "train_sft"
