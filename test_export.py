"""test_export.py: export_hf.py's folder computes what model.py computes (float32, tiny models, CPU).

For each supported shape (shared experts 0, 1, 2; top_k 1, 2, 3; grouped- and multi-query attention; leading
dense layers; tied and untied unembedding; one head, or several in each multi-token-prediction style) a
checkpoint is written, exported with export_hf.py's own command-line entry, and loaded back with
AutoModelForCausalLM / AutoTokenizer from the folder only. The weights are redrawn at unit scale first: at the
training init (std 0.02) attention is nearly uniform and routing nearly even, so a wrong RoPE convention or gate
scale would move the logits by less than the tolerance and the comparison would prove little. Negative controls
show that each convention matters. transformers and safetensors are optional: without them this file is skipped.
"""
import functools
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: every load below reads a local folder only
transformers = pytest.importorskip("transformers", reason="optional: export_hf.py needs transformers")
pytest.importorskip("safetensors", reason="optional: export_hf.py needs safetensors")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402  (after the skips)

import export_hf  # noqa: E402
import sample  # noqa: E402
from checkpoint import save_checkpoint  # noqa: E402
from data import EOT, GPT2_VOCAB, get_tokenizer, resolve_source  # noqa: E402
from model import Model, ModelConfig  # noqa: E402

TOL = 1e-4  # float32, eager attention: the bound on |logit difference|
TINY = dict(vocab_size=50304, seq_len=64, n_layer=2, n_head=4, n_embd=32, n_experts=4, top_k=2, n_shared_experts=1,
            n_predict=3)
SHAPES = {  # every setting the export maps, each in at least one shape
    "shared1-top2-tied": dict(),
    "shared0-top1-untied": dict(n_shared_experts=0, top_k=1, tie_embeddings=False),
    "shared0-top2-gqa-dense": dict(n_shared_experts=0, n_kv_head=2, n_dense_layers=1),
    "shared1-top1-mqa-dense-untied-1head": dict(top_k=1, n_kv_head=1, n_dense_layers=1, tie_embeddings=False,
                                                n_predict=1, rope_base=500.0),
    "shared2-top3-expert_hidden": dict(n_shared_experts=2, top_k=3, expert_hidden=24, n_layer=3, n_dense_layers=1),
    "sequential-heads-untied": dict(mtp_style="sequential", n_shared_experts=0, tie_embeddings=False),
    "shared-logits-heads": dict(mtp_style="shared", top_k=1, n_kv_head=2),
}
PROMPTS = ["def fibonacci(n):\n", "import os\nimport sys\n\n", "class Stack:\n    def push(self, item):"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: on a shared machine, kernels split over threads wait on each other (one greedy generation
    took 6 s with the default threads against 0.4 s with one, measured on 2 busy cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def unit_scale(model, seed):
    """Redraw every weight at unit scale (matrices N(0, 1/fan_in), norms N(1, 0.1^2)): decisive attention and
    routing, logits of order 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
            else:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
    return model


def write_checkpoint(out, cfg, seed=0, expert_bias=0.0):
    model = unit_scale(Model(cfg), seed)
    out.mkdir(parents=True)
    for block in model.blocks:
        if hasattr(block.ffn, "expert_bias"):
            block.ffn.expert_bias.fill_(expert_bias)
    save_checkpoint(out, 1, dict(model=model.state_dict(), config=asdict(cfg), step=1, run="test"), keep=0)
    return model.eval()


@functools.lru_cache(maxsize=None)
def stdlib_texts(n, stride=97):
    """n source files of the default corpus (the Python standard library), spread over it."""
    _, paths = resolve_source(None)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in paths[::stride][:n]]
    return tuple(t.replace("<|endoftext|>", "") for t in texts)  # the one string the two tokenizers read differently


@functools.lru_cache(maxsize=None)
def documents(B, T):
    """(B, T) ids: B documents of the default corpus, each [EOT] + its first T - 1 tokens (no padding)."""
    enc = get_tokenizer()
    docs = [[EOT] + enc.encode_ordinary(t)[:T - 1] for t in stdlib_texts(4 * B, stride=211)]
    return torch.tensor([d for d in docs if len(d) == T][:B])


def run_export(argv):
    rc = export_hf.run(argv)
    assert rc == 0, f"export_hf.py {' '.join(argv)} exited with {rc}"


@pytest.fixture(scope="module", params=list(SHAPES))
def exported(request, tmp_path_factory):
    """-> (our model, the exported folder), once per shape."""
    root = tmp_path_factory.mktemp(request.param)
    cfg = ModelConfig(**(TINY | SHAPES[request.param]))
    model = write_checkpoint(root / "out", cfg, seed=len(request.param))
    # --verify=False: the tests below make the same comparison and more (the check at export has its own test)
    run_export([f"--out_dir={root / 'out'}", f"--to={root / 'hf'}", "--verify=False"])
    return model, root / "hf"


def eager(folder):
    """The folder with transformers' reference attention and experts (plain PyTorch, float32)."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                experts_implementation="eager").eval()


def ours_head1(model, ids, **kw):
    with torch.no_grad():
        return model.logits(model(ids, heads=[0], **kw).hidden[0])


@torch.no_grad()
def test_logits_match(exported):
    """Head 1's logits on a batch of documents equal the exported model's, with the reference attention and
    experts of transformers and with whatever from_pretrained picks by default (what users get)."""
    model, folder = exported
    ids = documents(3, 48)
    ours = ours_head1(model, ids)
    assert ours.std() > 0.5  # unit-scale logits: the tolerance below is tight relative to them
    hf, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                    experts_implementation="eager", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    assert (hf(ids).logits - ours).abs().max() < TOL
    plain = AutoModelForCausalLM.from_pretrained(folder)  # the call: config.json says float32
    assert plain.dtype == torch.float32 and (plain(ids).logits - ours).abs().max() < TOL
    # a right-padded batch (lm-evaluation-harness's kind): equal at every real position
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 30:], mask[2, 11:] = False, False
    padded = ids.masked_fill(~mask, EOT)
    diff = (hf(padded, attention_mask=mask.long()).logits - ours_head1(model, padded, attention_mask=mask)).abs()
    assert diff[mask].max() < TOL


@torch.no_grad()
def test_greedy_generation_matches_sample_py(exported):
    """transformers' greedy generate from the folder's tokenizer and generation_config gives sample.py's greedy
    tokens: the tokenizer puts EOT first as training did, and generation stops at EOT as sample.py does."""
    model, folder = exported
    hf, tok, enc = eager(folder), AutoTokenizer.from_pretrained(folder), get_tokenizer()
    lengths = []
    for text in PROMPTS:
        prompt = tok(text)["input_ids"]
        assert prompt == [EOT] + enc.encode_ordinary(text)
        ours, _ = sample.generate(model, prompt, 32, temperature=0)
        theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
        assert theirs == ours, text
        lengths.append(len(ours))
    assert max(lengths) > 8  # not a test of stopping at once


@torch.no_grad()
def test_mtp_heads_file_reproduces_every_head(exported):
    """Heads 2..n_predict, loaded from mtp_heads.safetensors and run as mtp_heads.json says, give our heads' logits
    (parallel: blocks on the last layer's input; sequential: depths reading the tokens ahead, zero past a text's
    end; shared logits: no parameters, head 1 alone), on full rows and on right-padded ones."""
    model, folder = exported
    cfg = model.cfg
    if cfg.n_predict == 1:
        assert not (folder / export_hf.HEADS_JSON).exists() and not (folder / export_hf.HEADS_FILE).exists()
    else:
        meta = json.loads((folder / export_hf.HEADS_JSON).read_text())
        assert (meta["style"], meta["heads"], meta["predicts"][0]) == (cfg.mtp_style, cfg.n_predict - 1, "token t+2")
        assert (folder / export_hf.HEADS_FILE).exists() == (cfg.mtp_style != "shared")
    hf = eager(folder)
    heads = export_hf.load_mtp_heads(folder, hf)
    ids = documents(3, 40)
    ours = model.logits(model(ids).hidden)  # (n_predict, B, T, V); shared logits: (1, B, T, V)
    assert ours.shape[0] == 1 + len(heads)
    assert (export_hf.mtp_logits(hf, heads, ids) - ours).abs().max() < TOL
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 25:], mask[2, 7:] = False, False
    ours = model.logits(model(ids, attention_mask=mask).hidden)
    assert (export_hf.mtp_logits(hf, heads, ids, mask.long()) - ours).abs()[:, mask].max() < TOL


def test_settings_are_mapped(exported):
    """config.json and generation_config.json say what the checkpoint's ModelConfig says."""
    model, folder = exported
    cfg, c = model.cfg, json.loads((folder / "config.json").read_text())
    assert (c["model_type"], c["vocab_size"], c["hidden_size"], c["num_hidden_layers"]) == (
        "qwen2_moe", cfg.vocab_size, cfg.n_embd, cfg.n_layer + 1)
    assert c["num_key_value_heads"] == (cfg.n_kv_head or cfg.n_head)
    assert c["mlp_only_layers"] == list(range(cfg.n_dense_layers)) + [cfg.n_layer]
    assert c["intermediate_size"] == 4 * cfg.n_embd * 2 // 3 and c["moe_intermediate_size"] == cfg.ffn_hidden
    assert c["shared_expert_intermediate_size"] == (cfg.n_shared_experts * cfg.ffn_hidden or export_hf.ZERO_SHARED)
    assert c["norm_topk_prob"] == (cfg.top_k > 1) and c["tie_word_embeddings"] == cfg.tie_embeddings
    assert c["max_position_embeddings"] == cfg.seq_len and c["rope_parameters"]["rope_theta"] == cfg.rope_base
    g = json.loads((folder / "generation_config.json").read_text())
    assert g["eos_token_id"] == EOT and g["suppress_tokens"] == list(range(GPT2_VOCAB, cfg.vocab_size))


# ----------------------------------------------------------------------------- negative controls

@pytest.fixture(scope="module")
def default_shape(tmp_path_factory):
    root = tmp_path_factory.mktemp("control")
    model = write_checkpoint(root / "out", ModelConfig(**TINY), seed=1)
    run_export([f"--out_dir={root / 'out'}", f"--to={root / 'hf'}", "--verify=False"])
    return model, root


def interleave_rows(w, hd):
    """q/k projection rows in the interleaved-pair RoPE layout (Meta's original Llama) instead of rotate-half:
    the permutation a converter between the two conventions applies."""
    perm = torch.arange(hd).view(2, hd // 2).t().reshape(-1)  # 0, hd/2, 1, hd/2 + 1, ...
    return w.view(-1, hd, w.shape[-1])[:, perm].reshape_as(w)


@torch.no_grad()
@pytest.mark.parametrize("mistake", ["rope_convention", "shared_expert_scale", "top_k_renormalization"])
def test_each_convention_matters(default_shape, mistake):
    """Export with one convention wrong and the logits test fails by far more than its tolerance."""
    model, root = default_shape
    hf, ids = eager(root / "hf"), documents(3, 48)
    ours = ours_head1(model, ids)
    assert (hf(ids).logits - ours).abs().max() < TOL  # right before the mistake
    hd = model.cfg.n_embd // model.cfg.n_head
    for layer in hf.model.layers:
        if mistake == "rope_convention":
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.copy_(interleave_rows(proj.weight, hd))
        elif mistake == "shared_expert_scale" and hasattr(layer.mlp, "shared_expert"):
            layer.mlp.shared_expert.down_proj.weight /= 2  # ours, not doubled for the 0.5 gate
        elif mistake == "top_k_renormalization" and hasattr(layer.mlp, "gate"):
            layer.mlp.gate.norm_topk_prob = False
    assert (hf(ids).logits - ours).abs().max() > 100 * TOL


def test_export_refuses_a_wrong_export(default_shape, monkeypatch, capsys):
    """The check at export: a mapping mistake (the shared expert not doubled) is caught, nothing is left at
    --to or beside it, exit status 1 with one error line; the right export passes the same check."""
    model, root = default_shape
    right = export_hf.block_tensors

    def wrong(block, cfg):
        t = right(block, cfg)
        if "mlp.shared_expert.down_proj.weight" in t:
            t["mlp.shared_expert.down_proj.weight"] = t["mlp.shared_expert.down_proj.weight"] / 2
        return t
    monkeypatch.setattr(export_hf, "block_tensors", wrong)
    to = root / "checked"
    assert export_hf.run([f"--out_dir={root / 'out'}", f"--to={to}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: the exported model's logits differ from ours")
    assert not to.exists() and not list(root.glob(".tmp-*"))
    monkeypatch.setattr(export_hf, "block_tensors", right)
    assert export_hf.run([f"--out_dir={root / 'out'}", f"--to={to}"]) == 0
    assert "verified: transformers' logits match ours within" in capsys.readouterr().err


# ----------------------------------------------------------------------------- tokenizer

def test_tokenizer_matches_tiktoken(default_shape):
    """AutoTokenizer from the folder gives data.get_tokenizer()'s ids on a sample of the default corpus and on
    awkward text (spaces, tabs, CRLF, non-ASCII, contractions, digits), and decodes back to the text."""
    _, root = default_shape
    tok, enc = AutoTokenizer.from_pretrained(root / "hf"), get_tokenizer()
    awkward = "héllo\u00a0 世界\r\n\t\tx  = 'don't' I'll 12345678  \n\n\n  \U0001f600 ünïcödé\u200b end "
    texts = [*stdlib_texts(30), awkward]
    assert sum(map(len, texts)) > 200_000
    for text in texts:
        ids = enc.encode_ordinary(text)
        assert tok(text, add_special_tokens=False, verbose=False)["input_ids"] == ids
        assert tok(text, verbose=False)["input_ids"] == [EOT] + ids  # every document begins with EOT
        assert tok.decode(ids) == enc.decode(ids)
    assert len(tok) == GPT2_VOCAB and tok.eos_token_id == EOT and tok.bos_token_id == EOT


# ----------------------------------------------------------------------------- bad input

def one_error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_is_one_error_line_and_exit_2(default_shape, tmp_path, capsys):
    """Each a one-line `error:` naming the setting or file, exit status 2, and nothing written anywhere."""
    _, root = default_shape
    out, new = root / "out", f"--to={tmp_path / 'new'}"
    cases = [
        ([f"--out_dir={tmp_path / 'missing'}", new], "no such folder"),
        ([f"--out_dir={out}", f"--ckpt={tmp_path / 'missing.pt'}", new], "no such file"),
        ([f"--out_dir={out}", f"--to={root / 'hf'}"], "exists and is not empty"),
        ([f"--out_dir={out}", f"--to={out}", "--overwrite=True"], "no config.json of an earlier export"),
        ([f"--out_dir={out}", f"--to={out / 'checkpoints.json'}"], "is a file"),
        ([f"--out_dir={out}", "--to_dir=x"], "unknown setting 'to_dir'"),
        ([f"--out_dir={out}", "--overwrite=yes", new], "expected bool"),
    ]
    for argv, says in cases:
        before = sorted(p.name for p in root.iterdir())
        assert export_hf.run(argv) == 2, argv
        assert says in one_error(capsys), argv
        assert sorted(p.name for p in root.iterdir()) == before and not list(tmp_path.iterdir()), argv


def test_expert_bias_is_refused(tmp_path, capsys):
    """A model trained with aux-loss-free balancing chooses experts with a bias Qwen2-MoE lacks: refused."""
    write_checkpoint(tmp_path / "out", ModelConfig(**TINY), expert_bias=0.01)
    assert export_hf.run([f"--out_dir={tmp_path / 'out'}", f"--to={tmp_path / 'hf'}"]) == 2
    assert "expert_bias" in one_error(capsys) and not (tmp_path / "hf").exists()


def test_overwrite_replaces_an_earlier_export(default_shape, tmp_path):
    """--overwrite=True replaces an earlier export whole (no file of the old one stays), with nothing left
    beside it; an empty folder is taken without it."""
    _, root = default_shape
    to = tmp_path / "hf"
    to.mkdir()
    run_export([f"--out_dir={root / 'out'}", f"--to={to}", "--verify=False"])
    (to / "stale.txt").write_text("from an earlier export")
    run_export([f"--out_dir={root / 'out'}", f"--to={to}", "--overwrite=True", "--verify=False"])
    assert not (to / "stale.txt").exists() and (to / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_command_line(tmp_path):
    """The script itself: exit status 2 and one `error:` line on stderr."""
    r = subprocess.run([sys.executable, "export_hf.py", f"--out_dir={tmp_path / 'missing'}", f"--to={tmp_path / 'x'}"],
                       cwd=Path(__file__).parent, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
