"""The ``hypo-fast quickstart`` command: its printed loss equals a direct computation."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hypo_fast import cli, reference

ARGV = ["quickstart", "--pairs", "1", "--seq-len", "16", "--hidden", "32", "--vocab", "100"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes: one intra-op thread avoids OpenMP spin-waits on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def printed(out: str, key: str) -> float:
    m = re.search(rf"^{key}: (\S+)$", out, re.MULTILINE)
    assert m, f"no '{key}:' line in:\n{out}"
    return float(m.group(1))


def direct_loss(pairs, seq_len, d, vocab, seed=0, beta=cli.BETA):
    """Sigmoid DPO written out by hand on reference per-sequence log-prob sums."""
    inp = cli.build_inputs(pairs, seq_len, d, vocab, seed=seed)
    n_seq = 2 * pairs

    def seq_logps(weight):
        z = inp.hidden.double() @ weight.double().T
        lp = -F.cross_entropy(z.reshape(-1, vocab), inp.labels.reshape(-1), reduction="none")
        return lp.reshape(n_seq, seq_len).sum(1)

    pol, ref = seq_logps(inp.weight), seq_logps(inp.ref_weight)
    margin = (pol[:pairs] - ref[:pairs]) - (pol[pairs:] - ref[pairs:])
    loss = -F.logsigmoid(beta * margin).mean()
    return float(loss), float((margin > 0).double().mean()), inp


def test_quickstart_prints_the_direct_loss(capsys):
    assert cli.main(ARGV) == 0
    out = capsys.readouterr().out
    loss, acc = printed(out, "loss"), printed(out, "accuracy")
    assert math.isfinite(loss) and loss > 0
    expected, expected_acc, inp = direct_loss(1, 16, 32, 100)
    assert loss == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert acc == expected_acc
    assert "N=32 tokens, d=32, V=100" in out
    assert re.search(r"^wall time .*: \d+\.\d+ s$", out, re.MULTILINE)
    assert re.search(r"^peak RSS .*: (\d+\.\d MiB|n/a)$", out, re.MULTILINE)
    # the inputs look like the help says: prompt half ignored, labels in range, sane entropy
    assert (inp.labels[:, :8] == -100).all() and (inp.labels[:, 8:] >= 0).all()
    assert (inp.labels < 100).all()
    assert 0.5 < inp.mean_entropy < math.log(100)
    m = re.search(r"mean entropy over completion tokens: (\S+) nats", out)
    assert m and float(m.group(1)) == pytest.approx(inp.mean_entropy, abs=1e-3)


def test_quickstart_backward_reaches_policy_and_matches_reference_sums():
    args = cli.build_parser().parse_args([*ARGV, "--seed", "3"])
    r = cli.run_quickstart(args)
    inp = r["inputs"]
    assert inp.hidden.grad is not None and inp.weight.grad is not None
    assert all(math.isfinite(g) and g > 0 for g in r["grad_norms"])
    assert inp.ref_weight.grad is None
    # the per-sequence sums the loss used are the reference op's
    out = reference.linear_logprob(inp.hidden.detach(), inp.weight.detach(), inp.labels,
                                   seq_ids=inp.seq_ids)
    assert out.seq_count.tolist() == [8.0, 8.0]
    expected, _, _ = direct_loss(1, 16, 32, 100, seed=3)
    assert r["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_realistic_entropy_calibration():
    inp = cli.build_inputs(1, 8, 64, 5000, seed=1)
    assert 2.5 < inp.mean_entropy < 3.5  # TARGET_ENTROPY = 3 nats, far below log V = 8.5
    assert not torch.equal(inp.weight, inp.ref_weight)


@pytest.mark.parametrize("bad", [["--backend", "nope"], ["--pairs", "0"], ["--dtype", "int8"],
                                 ["--vocab", "1"]])
def test_quickstart_rejects_bad_flags(bad, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*ARGV, *bad])
    assert e.value.code != 0
    assert bad[0] in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_cpu_peak_memory_is_in_bytes():
    """ru_maxrss is in KiB on Linux: the high-water mark in bytes is the kernel's VmHWM."""
    status = Path("/proc/self/status").read_text()
    hwm = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
    assert cli._max_rss_bytes() >= 0.5 * hwm * 1024


def test_quickstart_names_the_flag_it_cannot_honour(monkeypatch, capsys):
    """A backend or device this machine lacks: a usage error naming the flag, no traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for flags, text in ((["--device", "cuda"], "--device cuda: torch sees no CUDA device"),
                        (["--device", "gpu0"], "--device gpu0: "),
                        (["--backend", "triton"], "--backend triton: ")):
        with pytest.raises(SystemExit) as e:
            cli.main([*ARGV, *flags])
        assert e.value.code == 2
        assert text in capsys.readouterr().err


def test_quickstart_on_the_triton_backend_prints_the_same_loss(capsys):
    """``--backend triton`` (interpreted here) runs the fused kernels: same loss as the spec."""
    want, _, _ = direct_loss(1, 16, 32, 100)
    assert cli.main([*ARGV, "--backend", "triton"]) == 0
    out = capsys.readouterr().out
    assert "backend=triton" in out
    assert math.isclose(printed(out, "loss"), want, rel_tol=1e-5)
