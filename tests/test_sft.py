import argparse
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from nanoseek.checkpoint import load_model, save_pretrained
from nanoseek.commands import distill, sft
from nanoseek.errors import NanoseekError
from nanoseek.tasks import EOS_TEXT, format_completion, load_task
from nanoseek.tokenizer import Tokenizer, train_tokenizer
from nanoseek.train import sample
from nanoseek.train.sft import (
    IGNORE,
    Conversation,
    batch_at,
    collate,
    dense_student_config,
    encode_all,
    encode_conversation,
    init_model,
    load_pretrained_student,
    prompt_key,
    read_chat_jsonl,
    split_validation,
    task_conversations,
)

TASK = "arithmetic:min_digits=1,max_digits=2,ops=+-"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    task = load_task(TASK)
    texts = [p.prompt + "\n" + format_completion(*task.solution_trace(p)) for p in task.problems("train", 200)]
    texts.append("Hi there! Hello, how are you? Fine thanks.")
    out = tmp_path_factory.mktemp("sft_tok")
    train_tokenizer(texts, vocab_size=320, out_dir=out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello.", "reasoning_content": "old reasoning, dropped"},
    {"role": "user", "content": "How are you?"},
    {"role": "assistant", "content": "Fine, thanks.", "reasoning_content": "be polite"},
]


def test_loss_mask_only_final_assistant_turn(tok):
    ex = encode_conversation(tok, Conversation(CHAT, "x:1"))
    full = tok.apply_chat_template(CHAT)
    assert ex.input_ids == full[:-1] and len(ex.targets) == len(ex.input_ids)
    trained = [t for t in ex.targets if t != IGNORE]
    assert tok.decode(trained) == "<think>\nbe polite\n</think>\n\nFine, thanks." + EOS_TEXT
    first = next(i for i, t in enumerate(ex.targets) if t != IGNORE)
    assert all(t != IGNORE for t in ex.targets[first:])  # one block at the end...
    assert ex.input_ids[first] == tok.assistant_id  # ...starting with the token after the last <｜Assistant｜>
    assert ex.targets[first:] == full[first + 1:]  # targets are the next tokens
    # the earlier assistant turn ("Hello.") and the prompts carry no loss
    assert "Hello." in tok.decode(full[:first]) and "Hello." not in tok.decode(trained)


def test_task_conversations_and_collate(tok):
    task = load_task(TASK)
    convs = task_conversations(task, 3, seed=1)
    p = task.problems("train", 3, seed=1)[0]
    reasoning, answer = task.solution_trace(p)
    assert convs[0].messages == [{"role": "user", "content": p.prompt},
                                 {"role": "assistant", "content": answer, "reasoning_content": reasoning}]
    examples, dropped = encode_all(tok, convs, max_len=1000)
    assert dropped == 0
    x, y = collate(examples, tok.pad_id)
    t = max(len(e.input_ids) for e in examples)
    assert x.shape == y.shape == (3, t)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        assert x[i, :n].tolist() == e.input_ids and (x[i, n:] == tok.pad_id).all() and (y[i, n:] == IGNORE).all()
    short, dropped = encode_all(tok, convs, max_len=10)
    assert short == [] and dropped == 3


def test_bad_jsonl_lines(tmp_path, tok):
    good = json.dumps({"messages": CHAT})
    cases = [
        ("{not json", "invalid JSON"),
        (json.dumps({"text": "hi"}), "messages"),
        (json.dumps({"messages": []}), "messages"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "last message must be an assistant"),
        (json.dumps([1, 2]), "messages"),
    ]
    for bad, message in cases:
        path = tmp_path / "data.jsonl"
        path.write_text(good + "\n\n" + bad + "\n")  # the blank line 2 is skipped, line 3 is bad
        with pytest.raises(NanoseekError, match=rf"data\.jsonl:3: .*{message}"):
            read_chat_jsonl(path)
    # a line that parses but has a bad message is reported with its file:line when it is encoded
    path = tmp_path / "roles.jsonl"
    path.write_text(good + "\n" + json.dumps({"messages": [{"role": "robot", "content": "x"},
                                                           {"role": "assistant", "content": "y"}]}) + "\n")
    convs = read_chat_jsonl(path)
    with pytest.raises(NanoseekError, match=r"roles\.jsonl:2: chat: message 0 has role 'robot'"):
        encode_all(tok, convs, 1000)
    with pytest.raises(NanoseekError, match="not found"):
        read_chat_jsonl(tmp_path / "missing.jsonl")


def parse(module, argv):
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


def test_sft_steps_reduce_loss(tok, tok_dir, tmp_path):
    torch.set_num_threads(1)
    convs = task_conversations(load_task(TASK), 8, seed=2)
    examples, _ = encode_all(tok, convs, 1000)
    x, y = collate(examples, tok.pad_id)

    def loss(model) -> float:
        with torch.no_grad():
            return model.compute_loss(x, y)[1]["loss_main"]

    before = loss(init_model("test", None, tok.vocab_size, seed=0))
    args = parse(sft, ["--preset", "test", "--tokenizer", str(tok_dir), "--task", TASK, "--n", "8", "--steps", "12",
                       "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2", "--seed", "2", "--threads", "1",
                       "--out", str(tmp_path / "run")])
    sft.run(args)
    after = loss(load_model(tmp_path / "run" / "final"))
    assert after < before - 1.0  # from ~ln(vocab) = 5.8 to well below
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_000012" / "trainer_state.json").read_text())
    history = state["history"]["train"]
    assert len(history) == 12 and history[-1]["loss"] < history[0]["loss"]
    assert (tmp_path / "run" / "run.json").is_file() and (tmp_path / "run" / "loss.png").is_file()


def test_batches_are_a_pure_function_of_the_step(tok):
    examples, _ = encode_all(tok, task_conversations(load_task(TASK), 10), 1000)
    seen = [id(e) for i in range(5) for e in batch_at(examples, 4, i, seed=1)]  # 20 draws = two epochs
    assert sorted(seen[:10]) == sorted(map(id, examples)) == sorted(seen[10:])  # each epoch is a permutation
    assert [id(e) for e in batch_at(examples, 4, 3, seed=1)] == seen[12:16]
    train, val = split_validation(examples * 5, seed=0)  # 10 problems, each 5 times
    assert len(val) == 2 and len(train) == 40  # 2 prompts held out, none of their 10 copies trained on
    assert not {prompt_key(e) for e in val} & {prompt_key(e) for e in train}
    assert len({prompt_key(e) for e in val}) == 2


def test_sft_validation_holds_out_prompts_not_examples(tok):
    task = load_task("arithmetic:min_digits=1,max_digits=1,ops=+")  # a small space: problems repeat
    examples, _ = encode_all(tok, task_conversations(task, 400, seed=0), 1000)
    n_distinct = len({prompt_key(e) for e in examples})
    assert n_distinct < 300  # the draw repeats problems
    train, val = split_validation(examples, seed=0)
    assert len(val) == 20 and not {prompt_key(e) for e in val} & {prompt_key(e) for e in train}
    assert len({prompt_key(e) for e in val}) == 20 and len(train) + len(val) <= len(examples)


def test_sft_cli_from_scratch_and_finetune(tok_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CHAT}) + "\n")
    out = tmp_path / "sft"
    common = ["--steps", "2", "--batch-size", "4", "--threads", "1", "--save-every", "0"]
    sft.run(parse(sft, ["--preset", "test", "--tokenizer", str(tok_dir), "--data", str(data), "--task", TASK,
                        "--n", "6", "--out", str(out), *common]))
    final = out / "final"
    assert (final / "tokenizer.json").is_file() and (final / "config.json").is_file()
    record = json.loads((out / "run.json").read_text())
    assert record["stage"] == "sft" and record["steps"] == 2
    model = load_model(final)
    assert model.config.vocab_size == Tokenizer.from_dir(final).vocab_size
    # fine-tune the saved checkpoint (tokenizer read from it); --epochs sets the steps
    sft.run(parse(sft, ["--model", str(final), "--task", TASK, "--n", "4", "--epochs", "2", "--out",
                        str(tmp_path / "sft2"), *common]))
    assert json.loads((tmp_path / "sft2" / "run.json").read_text())["steps"] == 2  # 2 epochs of 4 in batches of 4
    assert load_model(tmp_path / "sft2" / "final").config == model.config
    with pytest.raises(NanoseekError, match="already holds a run"):
        sft.run(parse(sft, ["--model", str(final), "--task", TASK, "--n", "4", "--out", str(out), *common]))
    with pytest.raises(NanoseekError, match="--tokenizer"):
        sft.run(parse(sft, ["--preset", "test", "--task", TASK, "--n", "4", "--out", str(tmp_path / "x")]))
    with pytest.raises(NanoseekError, match="no training data"):
        sft.run(parse(sft, ["--model", str(final), "--out", str(tmp_path / "x")]))


def test_distill_dense_student(tok_dir, tmp_path):
    teacher = tmp_path / "teacher"
    save_pretrained(init_model("test", None, Tokenizer.from_dir(tok_dir).vocab_size), teacher, tokenizer_dir=tok_dir)
    traces = tmp_path / "traces.jsonl"
    convs = task_conversations(load_task(TASK), 5)
    traces.write_text("".join(json.dumps({"messages": c.messages}) + "\n" for c in convs))
    out = tmp_path / "student"
    distill.run(parse(distill, ["--teacher-data", str(traces), "--teacher", str(teacher), "--student-preset", "test",
                                "--steps", "2", "--batch-size", "4", "--threads", "1", "--out", str(out)]))
    student = load_model(out / "final")
    cfg = student.config
    assert cfg.n_routed_experts == 0 and cfg.first_k_dense_replace == cfg.num_hidden_layers
    assert cfg.num_nextn_predict_layers == 0 and not student.gates() and len(student.mtp) == 0
    assert cfg.vocab_size == load_model(teacher).config.vocab_size
    assert (out / "final" / "tokenizer.json").read_bytes() == (teacher / "tokenizer.json").read_bytes()
    assert json.loads((out / "run.json").read_text())["stage"] == "distill"
    empty = tmp_path / "none.jsonl"
    empty.write_text("")  # what `sample --keep-correct` writes when no sample was right
    with pytest.raises(NanoseekError, match="no traces in .*none.jsonl.*keep none"):
        distill.run(parse(distill, ["--teacher-data", str(empty), "--teacher", str(teacher), "--student-preset",
                                    "test", "--out", str(tmp_path / "s2")]))


def test_distill_into_a_pretrained_student(tok_dir, tmp_path):
    """--student-model starts from a pre-trained dense checkpoint (its MTP module dropped, every other weight kept)
    and refuses a MoE student or one trained with another tokenizer, in one line each."""
    vocab = Tokenizer.from_dir(tok_dir).vocab_size
    teacher = tmp_path / "teacher"
    save_pretrained(init_model("test", None, vocab), teacher, tokenizer_dir=tok_dir)
    base = init_model("test", None, vocab, seed=3)
    base = type(base)(dataclasses.replace(base.config, first_k_dense_replace=base.config.num_hidden_layers))
    # every block dense, with an MTP module (whose FFN is MoE)
    assert len(base.mtp) == 1
    save_pretrained(base, tmp_path / "student_base", tokenizer_dir=tok_dir)
    student = load_pretrained_student(tmp_path / "student_base", teacher, vocab)
    assert student.config == dense_student_config(base.config) and len(student.mtp) == 0
    for k, v in student.state_dict().items():
        assert torch.equal(v, base.state_dict()[k]), k
    traces = tmp_path / "traces.jsonl"
    traces.write_text("".join(json.dumps({"messages": c.messages}) + "\n"
                              for c in task_conversations(load_task(TASK), 5)))
    out = tmp_path / "student"
    distill.run(parse(distill, ["--teacher-data", str(traces), "--teacher", str(teacher), "--student-model",
                                str(tmp_path / "student_base"), "--steps", "2", "--batch-size", "4", "--threads",
                                "1", "--out", str(out)]))
    assert load_model(out / "final").config == student.config
    with pytest.raises(NanoseekError, match="routed experts; the student must be dense"):
        load_pretrained_student(teacher, teacher, vocab)
    other = tmp_path / "other_tok"
    train_tokenizer(["a b c d e f g"] * 3, vocab_size=300, out_dir=other)
    save_pretrained(base, tmp_path / "other", tokenizer_dir=other)
    with pytest.raises(NanoseekError, match="another tokenizer than the teacher"):
        load_pretrained_student(tmp_path / "other", teacher, vocab)


class ScriptedEngine:
    """Stands in for the Engine: returns scripted completion texts, in submission order."""

    def __init__(self, tok, outputs):
        self.tok, self.outputs = tok, iter(outputs)

    def submit(self, prompt_ids, params):
        text, reason = next(self.outputs)
        return SimpleNamespace(finished=True, output_ids=self.tok.encode(text), finish_reason=reason)

    def step(self):
        raise AssertionError("every scripted request is already finished")


def test_rejection_sampling_keeps_only_verified(tok, tmp_path):
    task = load_task(TASK)
    problems = task.problems("train", 2, seed=3)
    right = [format_completion(*task.solution_trace(p)) for p in problems]
    wrong = [format_completion("I guess.", f"\\boxed{{{int(p.answer) + 1}}}") for p in problems]
    outputs = [
        (right[0], "stop"),  # kept
        (wrong[0], "stop"),  # wrong answer
        (right[0], "stop"),  # duplicate of the first: written once
        (f"\\boxed{{{problems[0].answer}}}", "stop"),  # right number but no </think>: not verified
        (right[1], "length"),  # correct but cut off by max_new_tokens: not verified
        ("\n</think>\n\n" + f"\\boxed{{{problems[1].answer}}}", "stop"),  # empty reasoning: format 0
        ("Add.\n</think>\n\n" + f"\\boxed{{{problems[1].answer}}}", "stop"),  # kept
        (wrong[1], "stop"),
    ]
    records, summary = sample.rejection_sample(ScriptedEngine(tok, outputs), tok, task, problems, k=4,
                                               max_new_tokens=200, keep_correct=True, task_spec=TASK)
    assert summary == {"problems": 2, "samples": 8, "written": 2, "verified": 3, "problems_with_verified": 2}
    assert [(r["problem"], r["sample"]) for r in records] == [(0, 0), (1, 2)]
    reasoning, answer = task.solution_trace(problems[0])
    assert records[0]["messages"] == [{"role": "user", "content": problems[0].prompt},
                                      {"role": "assistant", "reasoning_content": reasoning, "content": answer}]
    for r in records:  # every written trace re-scores as correct and well-formed
        m = r["messages"][1]
        reward = task.score(problems[r["problem"]], format_completion(m["reasoning_content"], m["content"]))
        assert reward.accuracy == 1.0 and reward.format > 0
    # without --keep-correct everything distinct is written, with its reward
    records_all, _ = sample.rejection_sample(ScriptedEngine(tok, outputs), tok, task, problems, k=4,
                                             max_new_tokens=200, keep_correct=False)
    assert len(records_all) == 7 and sorted(r["accuracy"] for r in records_all) == [0, 0, 0, 1, 1, 1, 1]
    # the written file is SFT data
    path = tmp_path / "traces.jsonl"
    sample.write_jsonl(records, path)
    assert len(encode_all(tok, read_chat_jsonl(path), 1000)[0]) == 2
