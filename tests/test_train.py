"""Training: data preparation, the trainer, exact resume, Muon, QK-clip, MoE balancing, bad input."""

import gzip
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmarch import ModelConfig, get_config, preset_names
from llmarch.cli import main as cli_main
from llmarch.errors import CheckpointError, ConfigError, DataError
from llmarch.model.decoder import Decoder, build_model
from llmarch.training.balance import ExpertLoad, load_balancing_loss, router_modules
from llmarch.training.checkpointing import read_checkpoint
from llmarch.training.config import TrainConfig
from llmarch.training.data import DEFAULT_CORPUS, TokenData, prepare
from llmarch.training.loop import init_weights, length_eval, read_metrics, train, usable_length_multiples
from llmarch.training.optim import NS_COEFFICIENTS, Muon, QKClip, build_optimizer
from llmarch.training.scale import scale_config
from llmarch.training.schedule import lr_factor

CHARS = 300_000  # a slice of the bundled corpus: enough for the tests, fast to tokenise


@pytest.fixture(scope="session")
def corpus_text():
    with gzip.open(DEFAULT_CORPUS, "rt") as f:
        return f.read()[:CHARS]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus_text):
    d = tmp_path_factory.mktemp("data")
    (d / "corpus.txt").write_text(corpus_text)
    prepare(d / "corpus.txt", d / "tok", "bpe", vocab_size=512, progress=False)
    return d / "tok"


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cfg(data_dir, out, **kw):
    base = dict(arch="llama3.2-1b", data=str(data_dir), out=str(out), tokens=4 * 32 * 12, batch_size=4, seq_len=32,
                lr=3e-3, warmup=2, eval_every=4, eval_batches=2, progress=False)
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------


def test_prepare_counts_and_round_trip(data_dir, corpus_text):
    from tokenizers import Tokenizer

    meta = json.loads((data_dir / "meta.json").read_text())
    tok = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    assert meta["vocab_size"] == tok.get_vocab_size() == 512 and meta["dtype"] == "uint16"
    d = TokenData.open(data_dir)
    ids = np.concatenate([d.train, d.val]).astype(np.int64)
    assert len(d.train) == meta["train_tokens"] and len(d.val) == meta["val_tokens"]
    # the chunked, batched encoding equals encoding the whole text at once (+ one separator)
    whole = tok.encode(corpus_text).ids
    assert ids.tolist() == whole + [tok.token_to_id("<|endoftext|>")]
    assert tok.decode(whole) == corpus_text
    assert 0.04 < meta["val_tokens"] / len(ids) < 0.06


def test_default_corpus_is_large_enough():
    with gzip.open(DEFAULT_CORPUS, "rt") as f:
        text = f.read()
    assert len(text) > 5_000_000 and "To be, or not to be" in text
    # ~1.5M tokens with the default 8192 BPE (measured by `llmarch data prepare`); at >3 chars
    # per token for English BPE, 5M characters are comfortably above 1M tokens
    assert len(text) / 3.5 > 1_000_000


def test_batches_depend_only_on_seed_and_step(data_dir):
    d = TokenData.open(data_dir)
    x, y = d.train_batch(0, 5, 0, 0, 1, 4, 1, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    again, _ = d.train_batch(0, 5, 0, 0, 1, 4, 1, 16)
    assert torch.equal(x, again)
    # two ranks of 2 rows see the rows of one process with 4
    r0, _ = d.train_batch(0, 5, 0, 0, 2, 2, 1, 16)
    r1, _ = d.train_batch(0, 5, 0, 1, 2, 2, 1, 16)
    assert torch.equal(torch.cat([r0, r1]), x)


# ----------------------------------------------------------------------------------------
# scale-down rule and init
# ----------------------------------------------------------------------------------------


def test_scale_keeps_distinguishing_features():
    g = get_config("gemma3-270m")
    t = scale_config(g, "tiny", 512, 128)
    assert t.layer_types == g.layer_types[:6] and t.layer_types.count("sliding") == 5
    assert t.sliding_window == 16  # 512 / 32768 of 128 is below the context / 8 floor
    assert (t.norm_placement, t.qk_norm, t.tie_embeddings, t.norm_unit_offset) == ("sandwich", "head", True, True)
    assert t.embed_scale == pytest.approx(math.sqrt(t.hidden_size)) and t.vocab_size == 512
    s = scale_config(get_config("smollm3-3b"), "tiny", 512, 128)
    assert s.rope_layers == [True, True, True, False]
    ll = scale_config(get_config("llama3-8b"), "small", 512, 256)
    assert ll.num_heads // ll.num_kv_heads == 4 and ll.hidden_size == 256
    assert ll.intermediate_size == pytest.approx(256 * 14336 / 4096, abs=8)
    assert scale_config(get_config("gpt2"), "tiny", 512).num_kv_heads == 4  # MHA stays MHA


def test_init_weights():
    cfg = scale_config(get_config("gemma3-270m"), "tiny", 512, 64)
    torch.manual_seed(0)
    m = init_weights(Decoder(cfg))
    assert m.layers[0].attn_norm.weight.abs().max() == 0  # (1 + w) norm at identity
    std = float(m.layers[0].mlp.gate_proj.weight.detach().std())
    assert 0.017 < std < 0.023
    resid = float(m.layers[0].mlp.down_proj.weight.detach().std())
    assert resid == pytest.approx(0.02 / math.sqrt(2 * cfg.num_layers), rel=0.15)


def test_schedules():
    cfg = TrainConfig(arch="x", data="x", out="x", warmup=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[79] == 1.0 and f[99] == pytest.approx(0.0)
    cfg.schedule, cfg.min_lr_ratio = "cosine", 0.1
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[10] == pytest.approx(1.0, abs=1e-3) and f[55] == pytest.approx(0.55, abs=0.02) and f[-1] > 0.1


# ----------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("preset", preset_names())
def test_loss_decreases_for_every_preset(preset, data_dir, tmp_path):
    summary = train(run_cfg(data_dir, tmp_path, arch=preset, tokens=4 * 32 * 15, lr=5e-3))
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert losses[0] == pytest.approx(math.log(512), abs=0.3)  # init predicts ~uniformly
    assert np.mean(losses[-3:]) < losses[0] - 0.6, losses
    assert summary["finished"] and summary["final_val_loss"] < losses[0] - 0.6


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,schedule", [("adamw", "wsd"), ("muon", "cosine")])
def test_resume_reproduces_losses_exactly(optimizer, schedule, data_dir, tmp_path):
    kw = dict(optimizer=optimizer, schedule=schedule, tokens=4 * 32 * 8, grad_accum=2, batch_size=2)
    train(run_cfg(data_dir, tmp_path / "full", **kw))
    train(run_cfg(data_dir, tmp_path / "cut", stop_at=3, **kw))
    train(run_cfg(data_dir, tmp_path / "cut", **kw), resume=str(tmp_path / "cut"))
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    cut = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in cut] == list(range(1, 9))
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in cut] == [r[key] for r in full], key
    assert [r.get("val_loss") for r in cut] == [r.get("val_loss") for r in full]


def test_muon_update_is_orthogonal_newton_schulz():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 64, bias=False))  # "hidden" 2-D matrix (64 x 96)
    model.embed = nn.Embedding(4, 96)  # stays with AdamW
    opt = build_optimizer(model, "muon", lr=1.0, weight_decay=0.0)
    adamw, muon = opt.optimizers
    assert isinstance(muon, Muon) and muon.param_groups[0]["ns_coefficients"] == (3.4445, -4.7750, 2.0315)
    assert NS_COEFFICIENTS == (3.4445, -4.7750, 2.0315) and muon.param_groups[0]["ns_steps"] == 5
    assert [p for g in adamw.param_groups for p in g["params"]] == [model.embed.weight]
    w = model[0].weight
    g = torch.randn_like(w)
    before = w.detach().clone()
    w.grad = g.clone()
    muon.param_groups[0]["momentum"] = 0.0  # nesterov with zero momentum: the update is NS(g)
    muon.step()
    update = (before - w.detach()) / (0.2 * math.sqrt(max(w.shape)))  # undo the AdamW-RMS matching
    s = torch.linalg.svdvals(update.float())
    assert 0.6 < float(s.min()) and float(s.max()) < 1.3  # the quintic's band around 1 (vs 0.3-3 for g)
    # the same 5 quintic steps written out here, in float32
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / g.norm()
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    assert torch.allclose(update, x, atol=0.03)  # the iteration runs in bfloat16, as torch's does
    assert float(torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min()) > 3


@pytest.mark.parametrize("preset", ["llama3.2-1b", "deepseek-v3"])  # GQA, and MLA (K2's per-part rule)
def test_qk_clip_caps_max_logit(preset):
    cfg = scale_config(get_config(preset), "tiny", 512, 32)
    torch.manual_seed(0)
    model = init_weights(build_model(cfg, device="cpu"))
    att = model.layers[0].attn
    q_proj = att.q_proj if getattr(att, "q_proj", None) is not None else att.q_b_proj
    with torch.no_grad():
        q_proj.weight[: q_proj.weight.shape[0] // 2].mul_(100)  # large logits in heads 0 and 1 of layer 0
        (att.k_proj if hasattr(att, "k_proj") else att.kv_b_proj).weight.mul_(10)
    clip = QKClip(model, tau=5.0)
    x = torch.randint(0, 512, (2, 32))
    model(x)
    att0 = model.layers[0].attn  # its input (the embeddings) does not change with the clip
    before = clip.max_logits[id(att0)].clone()
    assert float(before.max()) > 5.0 and float(before.min()) < 5.0
    assert clip.apply() == int((before > 5.0).sum())
    model(x)
    expected = torch.minimum(before, torch.tensor(5.0))
    assert torch.allclose(clip.max_logits[id(att0)], expected, rtol=1e-4), (before, clip.max_logits[id(att0)])
    qwen = Decoder(scale_config(get_config("qwen3-0.6b"), "tiny", 512, 32))
    with pytest.raises(ConfigError, match="QK-norm"):
        QKClip(qwen, 5.0)


def test_qk_clip_on_a_kv_shared_layer_scales_its_queries_only():
    """A KV-shared layer has no keys of its own: QK-clip caps its logits through its queries and
    leaves the source layer's keys (and so the source layer's logits) as they were."""
    cfg = ModelConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, num_kv_shared_layers=1)
    torch.manual_seed(0)
    model = init_weights(build_model(cfg, device="cpu"))
    source, shared = model.layers[0].attn, model.layers[1].attn
    assert shared.k_proj is None
    with torch.no_grad():
        shared.q_proj.weight.mul_(300)
    clip = QKClip(model, tau=5.0)
    x = torch.randint(0, 512, (2, 32))
    model(x)
    before = {k: v.clone() for k, v in clip.max_logits.items()}
    assert float(before[id(source)].max()) < 5.0 < float(before[id(shared)].max())
    k_source = source.k_proj.weight.clone()
    assert clip.apply() == int((before[id(shared)] > 5.0).sum())
    assert torch.equal(source.k_proj.weight, k_source)
    model(x)
    expected = torch.minimum(before[id(shared)], torch.tensor(5.0))
    assert torch.allclose(clip.max_logits[id(shared)], expected, rtol=1e-4)
    assert torch.allclose(clip.max_logits[id(source)], before[id(source)])


# ----------------------------------------------------------------------------------------
# MoE balancing, on llmarch.model.moe.MoE
# ----------------------------------------------------------------------------------------


def tiny_moe(score: str, bias: bool) -> nn.Module:
    from llmarch.model.config import ModelConfig, MoEConfig
    from llmarch.model.moe import MoE

    moe = MoEConfig(num_experts=8, top_k=2, expert_size=8, score=score, score_correction_bias=bias)
    torch.manual_seed(0)
    m = MoE(ModelConfig(vocab_size=8, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2, moe=moe))
    with torch.no_grad():
        m.router.weight.normal_(0.0, 0.3)
        m.router.weight[0] += 0.5  # expert 0 favoured
        m.router.weight[1] += 0.3
    return m


def _imbalance(moe, x):
    moe(x)
    counts = moe.last_routing.expert_load().float()
    return float(counts.max() / counts.mean())


def test_bias_update_moves_toward_equal_load():
    moe = tiny_moe("sigmoid", bias=True)
    x = torch.randn(1, 512, 16) + 1.0
    load = ExpertLoad(router_modules(nn.Sequential(moe)))
    start = _imbalance(moe, x)
    for _ in range(1000):
        with torch.no_grad():  # only the router matters here: skip the experts (as MoE.forward routes)
            moe.last_routing = moe.router(x.view(-1, 16))
        load.record()
        load.update_bias(0.001, load.totals())
        load.reset()
    assert start > 2.0 and _imbalance(moe, x) < 1.2
    bias = moe.router.e_score_correction_bias
    assert bias[0] < 0 and bias[0] == bias.min()


def test_aux_loss_is_one_when_balanced_and_reduces_imbalance():
    balanced = SimpleNamespace(last_routing=SimpleNamespace(
        logits=torch.zeros(8, 8, requires_grad=True), indices=torch.arange(16).view(8, 2) % 8))
    assert float(load_balancing_loss([balanced]).detach()) == pytest.approx(1.0)
    moe = tiny_moe("softmax", bias=False)
    x = torch.randn(1, 512, 16) + 1.0
    start = _imbalance(moe, x)
    opt = torch.optim.SGD([moe.router.weight], lr=1.0)
    for _ in range(40):
        moe(x)
        loss = load_balancing_loss([moe])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert start > 2.0 and _imbalance(moe, x) < start * 0.7


def _cv_by_hand(fractions: list[list[float]]) -> float:
    """Mean over layers of (population std / mean) of the experts' load shares."""
    cvs = []
    for f in fractions:
        mean = sum(f) / len(f)
        cvs.append(math.sqrt(sum((x - mean) ** 2 for x in f) / len(f)) / mean)
    return sum(cvs) / len(cvs)


def test_moe_training_logs_load_and_updates_bias(data_dir, tmp_path):
    summary = train(run_cfg(data_dir, tmp_path, arch="deepseek-v3", tokens=4 * 32 * 4, aux_loss=0.01, bias_update=0.001,
                            length_multiples=[]))
    rows = read_metrics(tmp_path / "metrics.jsonl")
    n_moe = sum(scale_config(get_config("deepseek-v3"), "tiny", 512, 32).moe_layers)
    for r in rows:
        assert len(r["expert_load"]) == n_moe and len(r["expert_load"][0]) == 256
        assert sum(r["expert_load"][0]) == pytest.approx(1.0, abs=1e-3) and r["aux_loss"] > 0
        # the shares are rounded to 5 decimals in the row: the CV from them agrees to ~1e-3
        assert r["expert_cv"] > 0 and r["expert_cv"] == pytest.approx(_cv_by_hand(r["expert_load"]), rel=1e-2)
    assert summary["expert_load_cv"] == pytest.approx(sum(r["expert_cv"] for r in rows) / 4)
    assert summary["expert_load_cv_final"] == rows[-1]["expert_cv"]  # the last 10% of 4 steps: the last one
    assert summary["val_loss_ctx"] == {} and "val_loss_ctx" not in rows[-1]
    state = read_checkpoint(tmp_path)["model"]
    bias = [v for k, v in state.items() if k.endswith("e_score_correction_bias")]
    assert bias and all(float(b.abs().max()) == pytest.approx(0.004, abs=1e-6) for b in bias)  # 4 steps of gamma


def test_summary_has_length_eval_spikes_and_no_moe_fields(data_dir, tmp_path):
    cfg = run_cfg(data_dir, tmp_path, tokens=4 * 32 * 6)  # 6 steps; evaluation: 2 batches x 4 windows of 32
    summary = train(cfg)
    assert set(summary["val_loss_ctx"]) == {"1", "2", "4"}
    # 8 windows: a multiple of 4, so the 1x evaluation is the final one (same windows, same batches)
    assert summary["val_loss_ctx"]["1"] == pytest.approx(summary["final_val_loss"], rel=1e-9)
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["val_loss_ctx"] == summary["val_loss_ctx"]
    assert summary["loss_spikes"] == len(summary["spike_steps"]) and isinstance(summary["grad_norm_outliers"], list)
    assert summary["expert_load_cv"] is None and summary["expert_load_cv_final"] is None
    # 4x by hand: the trained model on the first 256 validation tokens as 2 windows of 128
    model = build_model(ModelConfig.from_dict(json.loads((tmp_path / "model_config.json").read_text())))
    model.load_state_dict(read_checkpoint(tmp_path)["model"])
    model.eval()
    val = torch.from_numpy(np.asarray(TokenData.open(data_dir).val[: 2 * 128 + 1], dtype=np.int64))
    losses = []
    with torch.no_grad():
        for w in range(2):
            seg = val[w * 128 : (w + 1) * 128 + 1]
            losses.append(F.cross_entropy(model(seg[None, :-1])[0], seg[1:], reduction="sum"))
    assert summary["val_loss_ctx"]["4"] == pytest.approx(float(sum(losses)) / 256, rel=1e-5)
    # the run reuses the final evaluation for 1x; evaluated afresh, 1x gives that same loss
    fresh = length_eval(model, TokenData.open(data_dir), cfg, model.config, torch.device("cpu"))
    assert fresh["1"] == pytest.approx(summary["final_val_loss"], rel=1e-6)
    assert fresh["4"] == pytest.approx(summary["val_loss_ctx"]["4"], rel=1e-6)


def test_length_multiples_the_model_and_data_allow(data_dir):
    cfg = run_cfg(data_dir, "unused", length_multiples=[4, 1, 2, 2])
    rope = scale_config(get_config("llama3.2-1b"), "tiny", 512, 32)
    assert usable_length_multiples(cfg, rope, windows=8) == [1, 2, 4]
    assert usable_length_multiples(cfg, rope, windows=3) == [1, 2]  # no 4x window in 3 x 32 tokens
    learned = scale_config(get_config("gpt2"), "tiny", 512, 32)
    assert learned.position == "learned" and learned.max_position_embeddings == 32
    assert usable_length_multiples(cfg, learned, windows=8) == [1]  # no position embedding past 32
    for bad in ([0], [1.5], "1,2", [True]):
        with pytest.raises(ConfigError, match="--length-multiples must be a list of positive integers"):
            run_cfg(data_dir, "unused", length_multiples=bad).check()


# ----------------------------------------------------------------------------------------
# bad input: clear errors before training, CLI exit 2 with one line
# ----------------------------------------------------------------------------------------


def _cli(capsys, *argv):
    rc = cli_main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


def test_cli_bad_shapes(capsys, data_dir, tmp_path):
    common = ["train", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--tokens", "1000", "--seq-len", "32"]
    rc, err = _cli(capsys, *common, "--arch", "llama3.2-1b", "--set", "num_kv_heads=3")
    assert rc == 2 and "num_heads (4) must be a multiple of num_kv_heads (3)" in err and len(err.splitlines()) == 1
    rc, err = _cli(capsys, *common, "--arch", "gemma3-270m", "--set", "sliding_window=64")
    assert rc == 2 and "sliding_window (64) is larger than the training context" in err
    rc, err = _cli(capsys, *common, "--arch", "llama3.2-1b", "--length-multiples", "1,x")
    assert rc == 2 and "--length-multiples must be comma-separated positive integers" in err
    rc, err = _cli(capsys, *common, "--arch", "llama3.2-1b", "--length-multiples", "1,0")
    assert rc == 2 and "--length-multiples must be a list of positive integers, e.g. 1,2,4, got [1, 0]" in err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_cli_empty_and_small_corpus(capsys, tmp_path, data_dir):
    (tmp_path / "empty.txt").write_text("  \n")
    rc, err = _cli(capsys, "data", "prepare", "--corpus", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "e"))
    assert rc == 2 and "is empty" in err and len(err.splitlines()) == 1
    (tmp_path / "small.txt").write_text("To be, or not to be, that is the question.\n" * 3)
    prepare(tmp_path / "small.txt", tmp_path / "s", str(data_dir / "tokenizer.json"), progress=False)
    rc, err = _cli(capsys, "train", "--arch", "llama3.2-1b", "--data", str(tmp_path / "s"), "--out", str(tmp_path / "r"),
                   "--seq-len", "32", "--no-progress")
    assert rc == 2 and "fewer than one batch of 8 sequences x 32 tokens" in err
    with pytest.raises(DataError):
        TokenData.open(tmp_path / "nowhere")


def test_resume_of_another_architecture_is_refused(capsys, data_dir, tmp_path):
    train(run_cfg(data_dir, tmp_path / "a", tokens=4 * 32 * 2))
    rc, err = _cli(capsys, "train", "--arch", "gemma3-270m", "--resume", str(tmp_path / "a"), "--no-progress")
    assert rc == 2 and "is of architecture 'llama3.2-1b', not 'gemma3-270m'" in err
    with pytest.raises(CheckpointError, match="different model configuration"):
        train(run_cfg(data_dir, tmp_path / "a", tokens=4 * 32 * 4, overrides={"qk_norm": "head"}), resume=str(tmp_path / "a"))
    rc, err = _cli(capsys, "train", "--resume", str(tmp_path / "nothing"))
    assert rc == 2 and "no checkpoint.safetensors" in err


@pytest.mark.slow
def test_cli_train_and_resume(capsys, data_dir, tmp_path):
    out = str(tmp_path / "run")
    args = ["train", "--arch", "smollm3-3b", "--data", str(data_dir), "--out", out, "--tokens", str(4 * 32 * 6),
            "--batch-size", "4", "--seq-len", "32", "--no-progress", "--eval-every", "3"]
    assert cli_main(args + ["--stop-at", "3"]) == 0
    assert cli_main(["train", "--resume", out, "--no-progress"]) == 0
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and "val_loss" in rows[-1]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["finished"]


# ----------------------------------------------------------------------------------------
# ablations
# ----------------------------------------------------------------------------------------


def test_peak_rss_is_the_child_process_own():
    """ablate forks a process per variant: its peak memory must not include the parent's."""
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    ballast = bytearray(600 * 1024 * 1024)
    ballast[:: 4096] = b"\1" * len(ballast[:: 4096])  # touch every page: the parent's RSS grows by 600 MB
    code = "from llmarch.training.loop import _peak_rss_mb; print(_peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"})
    # torch + llmarch alone: 220-281 MB (it moves by tens of MB between runs on one machine); with
    # the parent's memory it would be over 825 MB
    assert float(out.stdout) < 400, out.stdout
    del ballast
