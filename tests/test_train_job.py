"""The ``hypo-fast train`` command (hypo_fast.train_job) on a tiny Llama and a word-level
tokenizer saved as a model directory: pairs tokenized as TRL does (plain text and chat
templates), training, evaluation, precomputed reference log-probs, and the errors it gives."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from hf_helpers import tiny_llama, transformers

from hypo_fast.cli import main
from hypo_fast.losses import FusedLinearDPOLoss
from hypo_fast.preference_data import extract_prompt, read_pairs, tokenize_pairs

pytest.importorskip("accelerate")


pytestmark = pytest.mark.usefixtures("fresh_accelerate")


WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)] + ["user", "assistant"]
# A chat template in the words: "<s>", then "role content </s>" per message; "w9" first with
# the template argument greet; "assistant" at the end for the generation prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if greet %}w9 {% endif %}{% for m in messages %}{{ m['role'] }} "
    "{{ m['content'] }} {{ eos_token }} {% endfor %}{% if add_generation_prompt %}assistant"
    "{% endif %}"
)


def word_tokenizer(chat_template: str | None = None):
    """A word-level tokenizer over ``w0`` ... ``w59`` (and the two roles) that starts every text
    with ``<s>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", chat_template=chat_template)


@pytest.fixture
def model_dir(tmp_path):
    """A tiny Llama and :func:`word_tokenizer` saved as a model directory, and a JSON-lines
    file of pairs in its words."""
    word_tokenizer(CHAT_TEMPLATE).save_pretrained(tmp_path / "model")
    tiny_llama(False, torch.float32, vocab=len(WORDS)).save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(f"w{i}" for i in torch.randint(0, 60, (n,), generator=g).tolist())

    rows = [{"prompt": text(3), "chosen": " " + text(4), "rejected": " " + text(2)}
            for _ in range(6)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return tmp_path / "model", data


@pytest.fixture
def chat_data(tmp_path):
    """The pairs of :func:`model_dir`'s kind as conversations (TRL's conversational format)."""
    g = torch.Generator().manual_seed(1)

    def message(role, n):
        words = " ".join(f"w{i}" for i in torch.randint(0, 60, (n,), generator=g).tolist())
        return [{"role": role, "content": words}]

    rows = [{"prompt": message("user", 2 + i % 2), "chosen": message("assistant", 3),
             "rejected": message("assistant", 1 + i % 3)} for i in range(6)]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def ids(text):
    return [WORDS.index(w) for w in text.split()]


def test_conversations_are_tokenized_with_the_chat_template_as_trl_does():
    tok = word_tokenizer(CHAT_TEMPLATE)
    user = [{"role": "user", "content": "w1 w2"}]
    rows = [
        {"prompt": user, "chosen": [{"role": "assistant", "content": "w3"}],
         "rejected": [{"role": "assistant", "content": "w4 w5"}]},
        {"prompt": user, "chosen": [{"role": "assistant", "content": "w3"}],
         "rejected": [{"role": "assistant", "content": "w4"}],
         "chat_template_kwargs": {"greet": True}},
    ]
    pairs, _ = tokenize_pairs(tok, rows, max_length=32)
    prompt = [1, *ids("user w1 w2"), 2, WORDS.index("assistant")]
    assert pairs == [
        {"prompt_ids": prompt, "chosen_ids": [*ids("w3"), 2], "rejected_ids": [*ids("w4 w5"), 2]},
        {"prompt_ids": [1, *ids("w9"), *prompt[1:]], "chosen_ids": [*ids("w3"), 2],
         "rejected_ids": [*ids("w4"), 2]},
    ]
    # a template that marks the generation prompt unlike a finished turn: not a prefix, dropped
    odd = word_tokenizer(CHAT_TEMPLATE.replace("assistant{% endif %}", "w8{% endif %}"))
    assert tokenize_pairs(odd, rows[:1], max_length=32) == (
        [], {"prompt not a token prefix": 1, "prompt fills --max-length": 0})
    with pytest.raises(ValueError, match=r"conversational .* the tokenizer has no chat template"):
        tokenize_pairs(word_tokenizer(), rows, max_length=32)


def test_train_command_evaluates_and_precomputes_the_reference_on_conversations(
        model_dir, chat_data, tmp_path):
    """Conversational pairs, evaluated every batch and at each epoch's end; precomputing the
    reference's log-probs changes no number."""
    model, _ = model_dir
    runs = {}
    for precompute in (False, True):
        out = tmp_path / f"pre{precompute}"
        main(["train", "--model", str(model), "--data", str(chat_data), "--output", str(out),
              "--eval-data", str(chat_data), "--eval-every", "1", "--batch-size", "3",
              "--epochs", "2", "--lr", "1e-2", *(["--precompute-ref-logps"] * precompute)])
        runs[precompute] = [json.loads(line) for line in
                            (out / "metrics.jsonl").read_text().splitlines()]
    lines = runs[False]
    evals = [line for line in lines if "eval_loss" in line]
    # batches 1 and 3 (every batch), 2 and 4 (each epoch's end), each once
    assert [line["batch"] for line in evals] == [1, 2, 3, 4]
    assert {k for k in evals[0] if k.startswith("eval_")} >= {
        "eval_loss", "eval_accuracy", "eval_chosen_rewards", "eval_margins"}
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # it learns the pairs it sees
    assert len(runs[True]) == len(lines)
    for plain, pre in zip(lines, runs[True], strict=True):
        assert plain.keys() == pre.keys()
        for k, v in plain.items():
            assert pre[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_train_command_resumes_from_a_checkpoint_as_if_never_stopped(model_dir, tmp_path,
                                                                     capsys):
    """Two epochs of 2 batches (3 pairs each), a checkpoint at every step; resumed from the
    one after the first step into the same directory: the same metrics.jsonl (the lines past
    the checkpoint replaced) and the same policy."""
    model, data = model_dir
    out = tmp_path / "out"
    argv = ["train", "--model", str(model), "--data", str(data), "--output", str(out),
            "--batch-size", "3", "--epochs", "2", "--lr", "1e-2", "--save-every", "1"]
    main(argv)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        f"checkpoint-{n}" for n in range(1, 5)]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    policy = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    capsys.readouterr()
    main([*argv, "--resume-from", str(out / "checkpoint-1")])
    trained = capsys.readouterr().out.splitlines()  # the lines of the batches it trained on
    assert [json.loads(line)["batch"] for line in trained] == [2, 3, 4]
    again = (out / "metrics.jsonl").read_text().splitlines()
    assert len(again) == len(lines) == 4
    for a, b in zip(lines, again, strict=True):
        assert json.loads(b) == pytest.approx(json.loads(a), rel=1e-6)
    resumed = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, value in policy.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-6, atol=1e-7, msg=name)


def test_implicit_prompts_are_extracted_as_trl_does(tmp_path):
    user = {"role": "user", "content": "w1 w2"}
    blue, green = ({"role": "assistant", "content": w} for w in ("w3", "w4"))
    rows = [{"chosen": "w1 w2 yes w5", "rejected": "w1 w2 no"},
            {"chosen": [user, blue], "rejected": [user, green], "chat_template_kwargs": {}}]
    path = tmp_path / "implicit.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_pairs(path) == [  # the space before the completions stays with them
        {"prompt": "w1 w2", "chosen": " yes w5", "rejected": " no"},
        {"prompt": [user], "chosen": [blue], "rejected": [green], "chat_template_kwargs": {}},
    ]
    assert extract_prompt("w1 w2", "w1 w2 w4") == {"prompt": "w1 w2", "chosen": "",
                                                   "rejected": " w4"}
    # characters, as TRL's: "w1 w3" and "w1 w4" share "w1 w"
    assert extract_prompt("w1", "w2") == {"prompt": "w", "chosen": "1", "rejected": "2"}
    path.write_text(json.dumps({"chosen": [blue], "rejected": [green]}) + "\n")
    with pytest.raises(ValueError, match=r"implicit\.jsonl:1: expected an object"):
        read_pairs(path)  # no message in common: no prompt


def test_train_command_trains_lora_adapters_against_the_base_model(model_dir, tmp_path):
    """--lora-r: the policy starts as its base (zero-initialised adapters: the first loss is
    log 2), learns, and is saved as adapters; precomputing the base's log-probs changes no
    number."""
    peft = pytest.importorskip("peft")
    model, data = model_dir
    runs = {}
    for precompute in (False, True):
        out = tmp_path / f"lora{precompute}"
        main(["train", "--model", str(model), "--data", str(data), "--output", str(out),
              "--lora-r", "16", "--lora-alpha", "32", "--lr", "1e-2", "--epochs", "6",
              "--batch-size", "3", *(["--precompute-ref-logps"] * precompute)])
        runs[precompute] = [json.loads(line) for line in
                            (out / "metrics.jsonl").read_text().splitlines()]
    steps = runs[False]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.05
    for plain, pre in zip(steps, runs[True], strict=True):
        assert pre == pytest.approx(plain, rel=1e-5, abs=1e-6)
    out = tmp_path / "loraFalse"
    assert (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()  # the adapters only
    tuned = peft.AutoPeftModelForCausalLM.from_pretrained(out)
    assert sorted({n.split(".")[-4] for n, _ in tuned.named_parameters() if "lora_" in n}) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    base = transformers.AutoModelForCausalLM.from_pretrained(model)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert not torch.allclose(tuned(input_ids=ids).logits, base(input_ids=ids).logits)
    # --merge-lora: the same run saved as a plain model, the adapters in its weights
    merged_dir = tmp_path / "merged"
    main(["train", "--model", str(model), "--data", str(data), "--output", str(merged_dir),
          "--lora-r", "16", "--lora-alpha", "32", "--lr", "1e-2", "--epochs", "6",
          "--batch-size", "3", "--merge-lora"])
    assert not (merged_dir / "adapter_config.json").exists()
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, tuned(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_changes_no_number(model_dir, tmp_path, lora):
    model, data = model_dir
    runs = []
    for checkpointing in (False, True):
        out = tmp_path / f"gc{checkpointing}"
        main(["train", "--model", str(model), "--data", str(data), "--output", str(out),
              "--batch-size", "3", "--epochs", "2", "--lr", "1e-2", *(["--lora-r", "4"] * lora),
              *(["--gradient-checkpointing"] * checkpointing)])
        runs.append([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
    assert runs[0][-1]["loss"] != runs[0][0]["loss"]
    for plain, recomputed in zip(*runs, strict=True):
        assert recomputed == pytest.approx(plain, rel=1e-5, abs=1e-6)


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def test_train_command_on_two_processes_trains_as_one_on_their_batches(model_dir, tmp_path):
    """torchrun with 2 CPU processes (Accelerate's multi-CPU, gloo) of 3 pairs a batch against
    one process of 6: the same steps, evaluations and policy, with the reference's log-probs
    precomputed, checkpoints saved by both and one TensorBoard log, the main process's."""
    model, data = model_dir
    common = ["train", "--model", str(model), "--data", str(data), "--epochs", "2",
              "--lr", "1e-2", "--eval-data", str(data), "--precompute-ref-logps",
              "--save-every", "1", *(["--report-to", "tensorboard"] * _has_tensorboard())]
    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(port), "-m", "hypo_fast.cli", *common, "--batch-size", "3",
         "--output", str(tmp_path / "two")],
        env={**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    main([*common, "--batch-size", "6", "--output", str(tmp_path / "one")])
    lines = {n: [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text()
                 .splitlines()] for n in ("one", "two")}
    assert [line["batch"] for line in lines["two"]] == [1, 1, 2, 2]  # a step, an evaluation
    for a, b in zip(lines["one"], lines["two"], strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    for n in ("one", "two"):
        assert sorted(p.name for p in (tmp_path / n).glob("checkpoint-*")) == [
            "checkpoint-1", "checkpoint-2"]
        if _has_tensorboard():
            assert len(list((tmp_path / n / "runs" / "hypo_fast").glob("events.*"))) == 1
    one, two = (transformers.AutoModelForCausalLM.from_pretrained(tmp_path / n).state_dict()
                for n in ("one", "two"))
    # AdamW's steps (1e-2 each) divide by the gradients' size: a weight whose gradient is near
    # its rounding (the processes sum in another order) may move 1e-5 differently
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-4, msg=name)


def test_pairs_are_tokenized_as_trl_does():
    tok = word_tokenizer()
    rows = [
        {"prompt": "w1 w2", "chosen": " w3", "rejected": " w4 w5"},
        {"prompt": "w1", "chosen": " w3</s>", "rejected": " w4"},  # EOS already there
        {"prompt": "w1 w2", "chosen": "w3", "rejected": " w4"},  # w2w3: not a prefix
        {"prompt": "w1 w2 w3", "chosen": " w4", "rejected": " w5"},  # fills max_length 4
    ]
    pairs, dropped = tokenize_pairs(tok, rows, max_length=4)
    assert pairs == [
        {"prompt_ids": [1, *ids("w1 w2")], "chosen_ids": [*ids("w3"), 2],
         "rejected_ids": [*ids("w4 w5"), 2]},
        {"prompt_ids": [1, *ids("w1")], "chosen_ids": [*ids("w3"), 2],
         "rejected_ids": [*ids("w4"), 2]},
    ]
    assert dropped == {"prompt not a token prefix": 1, "prompt fills --max-length": 1}
    kept, dropped = tokenize_pairs(tok, rows, max_length=4, truncation="keep_end")
    assert kept[:2] == pairs and len(kept) == 3  # the sequences keep their end: none empty
    assert dropped == {"prompt not a token prefix": 1, "prompt fills --max-length": 0}


def test_train_command_keeps_the_end_of_long_sequences(model_dir, tmp_path, capsys):
    """Prompts of 4 tokens, --max-length 4: keeping each sequence's start leaves no completion
    token (every pair dropped), keeping its end trains on them all."""
    model, data = model_dir
    argv = ["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "o"),
            "--max-length", "4", "--batch-size", "3", "--pad-to-multiple-of", "8"]
    with pytest.raises(SystemExit):
        main(argv)
    assert "dropped 6 of 6 pairs: 6 prompt fills --max-length" in capsys.readouterr().err
    main([*argv, "--truncation-mode", "keep_end"])
    steps = [json.loads(line) for line in
             (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(math.isfinite(s["loss"]) for s in steps)


def test_train_command_trains_and_saves_the_policy(model_dir, tmp_path):
    model, data = model_dir
    out = tmp_path / "out"
    assert main(["train", "--model", str(model), "--data", str(data), "--output", str(out),
                 "--lr", "1e-2", "--epochs", "4", "--batch-size", "3", "--seed", "1"]) == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["batch"] for s in steps] == [s["step"] for s in steps] == list(range(1, 9))
    lrs = [s["lr"] for s in steps]  # what each step used: linear decay to 0 over 8 steps
    assert lrs == pytest.approx([1e-2 * (8 - k) / 8 for k in range(8)], rel=1e-6)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.1
    trained = transformers.AutoModelForCausalLM.from_pretrained(out)
    start = transformers.AutoModelForCausalLM.from_pretrained(model)
    assert not torch.equal(trained.lm_head.weight, start.lm_head.weight)
    assert transformers.AutoTokenizer.from_pretrained(out).eos_token == "</s>"


def test_train_command_under_bf16_autocast_packed(model_dir, tmp_path):
    model, data = model_dir
    out = tmp_path / "bf16"
    main(["train", "--model", str(model), "--data", str(data), "--output", str(out),
          "--mixed-precision", "bf16", "--batch-size", "6", "--lr", "1e-2", "--epochs", "3",
          "--packed"])
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_train_command_runs_hpo_on_the_lines_auxiliary_rewards(model_dir, tmp_path):
    model, data = model_dir
    rows = [json.loads(line) for line in data.read_text().splitlines() if line]
    hpo = tmp_path / "hpo.jsonl"
    hpo.write_text("\n".join(json.dumps({**r, "chosen_aux_reward": i, "rejected_aux_reward":
                                         -0.5 * i}) for i, r in enumerate(rows)))
    runs = {}
    for coef in ("0", "2"):
        out = tmp_path / f"hpo{coef}"
        main(["train", "--model", str(model), "--data", str(hpo), "--output", str(out),
              "--loss", "hpo", "--aux-coef", coef, "--aux-tau", "0.5", "--batch-size", "6"])
        (runs[coef],) = [json.loads(line) for line in
                         (out / "metrics.jsonl").read_text().splitlines()]
    # policy = reference: DPO's log 2, and the auxiliary term -mean_s w_s S(y_s) > 0
    for step in runs.values():
        assert step["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert runs["0"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert runs["2"]["loss"] == pytest.approx(math.log(2) + 2 * runs["2"]["aux_loss"], rel=1e-6)
    assert runs["2"]["aux_loss"] > 0
    # the same rows train any other loss (the rewards are ignored)
    main(["train", "--model", str(model), "--data", str(hpo), "--output", str(tmp_path / "d"),
          "--batch-size", "6"])


@pytest.mark.parametrize(("loss", "lora"), [("hypo", False), ("simpo", False), ("hypo", True)])
def test_train_command_runs_hypo_with_online_samples_and_reference_free_losses(
        model_dir, tmp_path, loss, lora):
    model, data = model_dir
    out = tmp_path / loss
    hypo = ["--online-samples", "2", "--max-new-tokens", "3"] if loss == "hypo" else []
    main(["train", "--model", str(model), "--data", str(data), "--output", str(out),
          "--loss", loss, "--batch-size", "6", "--lr", "1e-3", *hypo,
          *(["--lora-r", "2"] * lora)])
    (step,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(step["loss"])
    assert ("kl_term" in step) == (loss == "hypo")
    if lora:  # zero-initialised adapters: the policy is its reference, the base model
        assert step["online_kl"] == pytest.approx(0, abs=1e-6)
        assert step["dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize(("argv", "want"), [
    (["--loss-type", "sigmoid", "bco_pair", "--loss-weights", "0.8", "0.2", "--rpo-alpha",
      "0.5", "--ld-alpha", "0.3", "--use-weighting", "--label-smoothing", "0.1"],
     {"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [0.8, 0.2], "compute_nll_loss": True,
      "alpha": 0.5, "ld_alpha": 0.3, "use_weighting": True, "label_smoothing": 0.1}),
    (["--loss-type", "ipo"], {"loss_type": "ipo", "compute_nll_loss": False,
                              "use_weighting": False, "ld_alpha": None}),
    (["--loss-type", "sigmoid", "bco_pair", "sft", "--loss-weights", "0.8", "0.2", "0.7"],
     {"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [0.8, 0.2], "compute_nll_loss": True,
      "alpha": 0.7}),
    (["--loss-type", "sft", "ipo", "--f-divergence-type", "js_divergence", "--discopop-tau",
      "0.2", "--f-alpha-divergence-coef", "0.3"],
     {"loss_type": "ipo", "loss_weights": None, "compute_nll_loss": True, "alpha": 1.0,
      "f_divergence_type": "js_divergence", "discopop_tau": 0.2,
      "f_alpha_divergence_coef": 0.3}),
    (["--loss", "hypo", "--loss-type", "hinge", "--rpo-alpha", "1"],
     {"loss_type": "hinge", "compute_nll_loss": True, "alpha": 1.0, "kl_coef": 0.1}),
    (["--loss", "simpo", "--cpo-alpha", "0", "--simpo-gamma", "1.2", "--label-smoothing",
      "0.05"], {"compute_nll_loss": False, "gamma": 1.2, "label_smoothing": 0.05}),
    (["--loss", "simpo"], {"compute_nll_loss": True, "alpha": 1.0, "gamma": 0.5}),
    (["--loss", "cpo", "--cpo-alpha", "0.3"], {"compute_nll_loss": True, "alpha": 0.3}),
], ids=["dpo-multi-rpo-ld-wpo", "dpo-ipo", "mpo-sft", "sft-f-divergence", "hypo-hinge-rpo",
        "simpo", "simpo-defaults", "cpo"])
def test_train_command_passes_trl_loss_options_to_the_loss(argv, want):
    """TRL's DPOConfig/CPOConfig knobs on the command line reach the loss module."""
    from hypo_fast.cli import build_parser
    from hypo_fast.train_job import _check, build_loss

    parser = build_parser()
    args = parser.parse_args(["train", "--model", "m", "--data", __file__, "--output", "o",
                              *argv])
    _check(parser, args)
    loss = build_loss(args)
    assert {k: getattr(loss, k) for k in want} == want


def test_train_command_builds_adamw_as_trl_does():
    """--weight-decay (TRL's default 0, not torch's 0.01) on the parameters transformers'
    Trainer decays (not biases, not norms), --adam-*; the frozen reference is not optimised."""
    from hypo_fast.cli import build_parser
    from hypo_fast.train_job import _optimizer
    from hypo_fast.trainer import PreferenceModel

    policy = tiny_llama(False, torch.float32)
    model = PreferenceModel(policy, FusedLinearDPOLoss(), tiny_llama(False, torch.float32))
    base = ["train", "--model", "m", "--data", "d", "--output", "o"]
    default = _optimizer(build_parser().parse_args(base), model)
    assert [g["weight_decay"] for g in default.param_groups] == [0.0, 0.0]
    optimizer = _optimizer(build_parser().parse_args(
        [*base, "--weight-decay", "0.1", "--adam-beta1", "0.8", "--adam-beta2", "0.95",
         "--adam-epsilon", "1e-6"]), model)
    names = {id(p): n.removeprefix("policy.") for n, p in model.named_parameters()}
    decayed, kept = ({names[id(p)] for p in g["params"]} for g in optimizer.param_groups)
    want = set(transformers.Trainer.get_decay_parameter_names(None, policy))
    assert decayed == want and kept == {n for n, _ in policy.named_parameters()} - want
    assert any("norm" in n for n in kept) and "lm_head.weight" in decayed
    assert [(g["weight_decay"], g["betas"], g["eps"]) for g in optimizer.param_groups] == [
        (0.1, (0.8, 0.95), 1e-6), (0.0, (0.8, 0.95), 1e-6)]


@pytest.mark.parametrize(("scheduler", "after_warmup"), [
    ("linear", [1, 2 / 3, 1 / 3]), ("cosine", [1, 0.75, 0.25]), ("constant", [1, 1, 1])])
@pytest.mark.parametrize("warmup", [["--warmup-steps", "3"], ["--warmup-ratio", "0.4"]],
                         ids=["steps", "ratio"])
def test_train_command_schedules_the_learning_rate(model_dir, tmp_path, scheduler,
                                                   after_warmup, warmup):
    """6 optimizer steps, 3 of linear warmup (0.4 of 6, rounded up), then the schedule; each
    line's lr is the one its step used."""
    model, data = model_dir
    out = tmp_path / "out"
    main(["train", "--model", str(model), "--data", str(data), "--output", str(out),
          "--batch-size", "1", "--lr", "1e-2", "--lr-scheduler", scheduler, *warmup])
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    want = [1e-2 * f for f in [0, 1 / 3, 2 / 3, *after_warmup]]
    assert lrs == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_train_command_stops_at_max_steps_with_the_schedule_over_them(model_dir, tmp_path):
    """--max-steps 4 of 3-step epochs: into the second epoch, evaluated once at the stop, the
    linear decay spread over the 4 steps."""
    model, data = model_dir
    out = tmp_path / "out"
    main(["train", "--model", str(model), "--data", str(data), "--output", str(out),
          "--batch-size", "2", "--lr", "1e-2", "--max-steps", "4", "--eval-data", str(data)])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert [(line["step"], line["epoch"]) for line in steps] == [(1, 0), (2, 0), (3, 0), (4, 1)]
    assert [line["lr"] for line in steps] == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3])
    assert [line["batch"] for line in lines if "eval_loss" in line] == [3, 4]


def test_train_command_keeps_the_newest_checkpoints(model_dir, tmp_path):
    """--save-total-limit 2 over 4 saved steps: the last two checkpoints stay, and one of
    them resumes; a directory not named by a step is left alone."""
    model, data = model_dir
    out = tmp_path / "out"
    (out / "checkpoint-best").mkdir(parents=True)
    argv = ["train", "--model", str(model), "--data", str(data), "--output", str(out),
            "--batch-size", "3", "--epochs", "2", "--save-every", "1", "--save-total-limit", "2"]
    main(argv)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-3", "checkpoint-4", "checkpoint-best"]
    main([*argv, "--resume-from", str(out / "checkpoint-3")])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-3", "checkpoint-4", "checkpoint-best"]


def test_train_command_trains_a_multi_loss_dpo_with_an_nll_term(model_dir, tmp_path):
    model, data = model_dir
    out = tmp_path / "out"
    main(["train", "--model", str(model), "--data", str(data), "--output", str(out),
          "--batch-size", "6", "--loss-type", "sigmoid", "bco_pair", "--loss-weights", "0.8",
          "0.2", "--rpo-alpha", "1"])
    (step,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert step["nll_loss"] > 0
    assert step["loss"] == pytest.approx(
        0.8 * step["loss_sigmoid"] + 0.2 * step["loss_bco_pair"] + step["nll_loss"], rel=1e-5)


def test_train_command_syncs_the_reference_as_tr_dpo(model_dir, tmp_path):
    """--ref-model-sync-steps 1: the reference moves after each step, so the second batch's
    rewards (β·log-ratios against it) are no longer those of a frozen reference."""
    model, data = model_dir
    runs = []
    for sync in ([], ["--ref-model-sync-steps", "1", "--ref-model-mixup-alpha", "0.5"]):
        out = tmp_path / f"sync{len(sync)}"
        main(["train", "--model", str(model), "--data", str(data), "--output", str(out),
              "--batch-size", "3", "--lr", "1e-2", *sync])
        runs.append([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
    frozen, synced = runs
    assert synced[0] == frozen[0]
    assert synced[1]["chosen_rewards"] != pytest.approx(frozen[1]["chosen_rewards"], rel=1e-3)


def test_train_command_reports_to_tensorboard(model_dir, tmp_path):
    """``--report-to tensorboard``: every number of metrics.jsonl, evaluations too, as a scalar
    at its batch, in --output/runs/<run name>."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, data = model_dir
    out = tmp_path / "out"
    main(["train", "--model", str(model), "--data", str(data), "--output", str(out),
          "--eval-data", str(data), "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-2",
          "--report-to", "tensorboard", "--run-name", "tiny"])
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "runs" / "tiny")).Reload()
    assert {"loss", "accuracy", "margins", "eval_loss", "optimizer_step"} <= set(
        events.Tags()["scalars"])
    from hypo_fast.cli import build_parser
    from hypo_fast.train_job import _tracker_config

    config = _tracker_config(build_parser().parse_args(
        ["train", "--model", "m", "--data", "d", "--output", "o", "--loss-type", "ipo"]))
    assert config["loss_type"] == "['ipo']" and config["lr"] == 1e-6
    assert "parser" not in config and config["ref_model"] == "None"
    for key, field in (("loss", "loss"), ("eval_loss", "eval_loss"),
                       ("chosen_rewards", "chosen_rewards"), ("optimizer_step", "step")):
        want = [(line["batch"], line[field]) for line in lines
                if key in line or key == "optimizer_step"]
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [step for step, _ in got] == [step for step, _ in want], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), key


def test_report_to_names_a_tracker_that_is_missing(model_dir, tmp_path, capsys, monkeypatch):
    """Accelerate drops a tracker it cannot import without a word; the command refuses it."""
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    model, data = model_dir
    base = ["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "o")]
    for trackers, message in [(["tensorboard"], "--report-to tensorboard: not installed"),
                              (["all"], "--report-to all: no tracker is installed"),
                              (["none", "wandb"], "--report-to none takes no other tracker")]:
        with pytest.raises(SystemExit):
            main([*base, "--report-to", *trackers])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_command_names_what_is_wrong(model_dir, tmp_path, capsys):
    model, data = model_dir
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w1", "chosen": "w2", "rejected": "w3"}\n{"prompt": "w1"}\n')
    small = tmp_path / "small"  # another vocabulary
    tiny_llama(False, torch.float32, vocab=40).save_pretrained(small)
    nan_aux = tmp_path / "nan_aux.jsonl"
    nan_aux.write_text('{"prompt": "w1", "chosen": "w2", "rejected": "w3", '
                       '"chosen_aux_reward": NaN}\n')
    mixed = tmp_path / "mixed.jsonl"  # a string prompt, message completions
    mixed.write_text(json.dumps({"prompt": "w1", "chosen": [{"role": "assistant", "content": "w2"}],
                                 "rejected": [{"role": "assistant", "content": "w3"}]}) + "\n")
    base = ["train", "--model", str(model), "--output", str(tmp_path / "o")]
    for argv, message in [
        (["--data", str(bad)], "bad.jsonl:2: expected an object whose prompt, chosen, "
                               "rejected are all strings or all lists of"),
        (["--data", str(data), "--eval-data", str(mixed)], "mixed.jsonl:1: expected an object"),
        (["--data", str(data), "--eval-data", str(tmp_path / "no.jsonl")],
         "--eval-data " + str(tmp_path / "no.jsonl") + ": no such file"),
        (["--data", str(data), "--eval-every", "2"], "--eval-every needs --eval-data"),
        (["--data", str(data), "--save-every", "0"], "--save-every must be >= 1"),
        (["--data", str(data), "--lora-alpha", "8"], "--lora-alpha needs --lora-r"),
        (["--data", str(data), "--merge-lora"], "--merge-lora needs --lora-r"),
        (["--data", str(data), "--ref-model", str(small)],
         f"--ref-model {small} has a vocabulary of 40, --model {model} one of 66"),
        (["--data", str(data), "--loss", "hpo"],
         "--data: --loss hpo needs chosen_aux_reward on every line"),
        (["--data", str(data), "--aux-tau", "2"],
         "--aux-tau is an option of --loss hpo, but --loss is dpo"),
        (["--data", str(data), "--loss", "hpo", "--aux-tau", "0"], "aux_tau"),
        (["--data", str(nan_aux)], "nan_aux.jsonl:1: chosen_aux_reward must be a finite number"),
        (["--data", str(data), "--resume-from", str(tmp_path)],
         f"--resume-from {tmp_path}: not a checkpoint (no trainer_state.json)"),
        (["--data", str(data), "--loss", "orpo", "--precompute-ref-logps"],
         "--loss orpo takes no reference model: nothing to precompute"),
        (["--data", str(tmp_path / "none.jsonl")], "none.jsonl: no such file"),
        (["--data", str(data), "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--data", str(data), "--lr", "nan"], "--lr must be a positive number"),
        (["--data", str(data), "--loss", "hypo", "--online-samples", "1"],
         "--estimator rloo needs --online-samples >= 2"),
        (["--data", str(data), "--kl-coef", "0.5"],
         "--kl-coef is an option of --loss hypo, but --loss is dpo"),
        (["--data", str(data), "--loss", "simpo", "--ref-model", str(model)],
         "--loss simpo takes no reference model"),
        (["--data", str(data), "--max-grad-norm", "-1"], "--max-grad-norm must be >= 0"),
        (["--data", str(data), "--simpo-gamma", "1"],
         "--simpo-gamma is an option of --loss simpo, but --loss is dpo"),
        (["--data", str(data), "--loss", "simpo", "--rpo-alpha", "1"],
         "--rpo-alpha is an option of --loss dpo, hypo or hpo, but --loss is simpo"),
        (["--data", str(data), "--loss", "orpo", "--label-smoothing", "0.1"],
         "--label-smoothing is an option of --loss dpo, hypo, hpo, simpo or cpo, but --loss "
         "is orpo"),
        (["--data", str(data), "--loss-type", "sigmoid", "hinge", "--loss-weights", "1"],
         "--loss-weights: one per --loss-type, got 1 for 2"),
        (["--data", str(data), "--loss-type", "sft"],
         "--loss-type sft needs a preference loss type beside it"),
        (["--data", str(data), "--loss-type", "sigmoid", "sft", "--rpo-alpha", "1"],
         "--loss-type sft and --rpo-alpha both add the NLL: give one"),
        (["--data", str(data), "--loss", "orpo", "--discopop-tau", "1"],
         "--discopop-tau is an option of --loss dpo, hypo or hpo, but --loss is orpo"),
        (["--data", str(data), "--ld-alpha", "2"], "ld_alpha must be in [0.0, 1.0]"),
        (["--data", str(data), "--weight-decay", "-1"], "--weight-decay must be >= 0"),
        (["--data", str(data), "--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1]"),
        (["--data", str(data), "--max-steps", "0"], "--max-steps must be >= 1"),
        (["--data", str(data), "--save-total-limit", "2"],
         "--save-total-limit needs --save-every"),
        (["--data", str(data), "--save-every", "1", "--save-total-limit", "0"],
         "--save-total-limit must be >= 1"),
        (["--data", str(data), "--warmup-ratio", "0.1", "--warmup-steps", "2"],
         "give --warmup-steps or --warmup-ratio, not both"),
        (["--data", str(data), "--adam-beta2", "1"], "--adam-beta2 must be in [0, 1)"),
        (["--data", str(data), "--adam-epsilon", "0"], "--adam-epsilon must be > 0"),
        (["--data", str(data), "--ref-model-mixup-alpha", "0.5"],
         "--ref-model-mixup-alpha needs --ref-model-sync-steps"),
        (["--data", str(data), "--ref-model-sync-steps", "0"],
         "--ref-model-sync-steps must be >= 1"),
        (["--data", str(data), "--ref-model-sync-steps", "2", "--precompute-ref-logps"],
         "--ref-model-sync-steps moves the reference model: not with --precompute-ref-logps"),
        (["--data", str(data), "--ref-model-sync-steps", "2", "--ref-model-mixup-alpha", "2"],
         "--ref-model-mixup-alpha must be in [0, 1]"),
        (["--data", str(data), "--loss", "simpo", "--ref-model-sync-steps", "2"],
         "--ref-model-sync-steps is an option of --loss dpo, hypo or hpo, but --loss is simpo"),
    ]:
        with pytest.raises(SystemExit):
            main(base + argv)
        err = capsys.readouterr().err
        assert message in err and "usage: hypo-fast train" in err
