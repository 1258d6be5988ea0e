"""Tests of sample.py: KV-cache decoding equals recomputing the sequence; greedy speculative decoding is
token-for-token plain greedy decoding (on a model trained until its heads agree, so drafts are accepted);
speculative sampling keeps head 1's distribution; fixed seeds reproduce; the command line end to end."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loss import mtp_loss, mtp_targets
from model import Model, ModelConfig
from sample import KVCache, decode, generate, probs_from

V = 16
HERE = Path(__file__).parent


def tiny(seed=0):
    torch.manual_seed(seed)
    return Model(ModelConfig(vocab_size=V, seq_len=64, n_layer=1, n_head=2, n_embd=32, n_experts=4, top_k=2,
                             n_predict=4)).double()


@pytest.fixture(scope="module")
def cyclic_model():
    """A tiny model trained on a repeating pattern: its MTP heads learn the future, so drafts get accepted."""
    model = tiny()
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(150):
        offsets = torch.randint(0, 16, (8,))
        ids = torch.stack([pattern.roll(-int(o)).repeat(4) for o in offsets])  # (8, 64)
        doc = torch.zeros_like(ids, dtype=torch.int32)
        out = model(ids, doc_ids=doc)
        sums, counts = mtp_loss(out.hidden, model.lm_head.weight, mtp_targets(ids, doc, 4))
        ((sums / counts).sum() + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), pattern


def test_kv_cache_equals_recomputing():
    model = tiny().eval()
    ids = torch.randint(0, V, (1, 20))
    full = model(ids).hidden[:, 0]  # (n_predict, T, D)
    cache = KVCache(model, 1, 64)
    parts = [decode(model, ids[:, :7], cache)[:, 0]]  # prompt, then one token at a time, then a chunk
    for t in range(7, 12):
        parts.append(decode(model, ids[:, t:t + 1], cache)[:, 0])
    parts.append(decode(model, ids[:, 12:20], cache)[:, 0])
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)
    cache.pos = 10  # roll back and feed other tokens: must equal the recomputed other sequence
    other = ids.clone()
    other[:, 10:] = (other[:, 10:] + 3) % V
    h = decode(model, other[:, 10:], cache)[:, 0]
    torch.testing.assert_close(h, model(other).hidden[:, 0, 10:], rtol=1e-10, atol=1e-10)


def test_greedy_speculative_equals_plain(cyclic_model):
    model, pattern = cyclic_model
    accepted = []
    for prompt in ([3, 1, 4], [9, 2], [7], torch.randint(0, V, (5,)).tolist()):
        plain, s_plain = generate(model, prompt, 40, temperature=0.0)
        spec, s_spec = generate(model, prompt, 40, temperature=0.0, speculative=True)
        assert spec == plain
        assert s_plain["tokens_per_forward"] <= 1.0
        accepted.append(s_spec["tokens_per_forward"])
    assert accepted[0] > 1.5, accepted  # in the pattern, drafts are accepted: the accept path is exercised
    random_model = tiny(seed=1).eval()  # mostly rejected drafts: the rollback path
    prompt = [1, 2, 3]
    assert generate(random_model, prompt, 30, speculative=True)[0] == generate(random_model, prompt, 30)[0]


def test_sampling_is_reproducible(cyclic_model):
    for model in (cyclic_model[0], tiny(seed=2).eval()):  # a trained and a random (flat) model
        run = lambda seed, spec: generate(model, [3, 1], 30, temperature=1.5, top_k=8, top_p=0.95,
                                          gen=torch.Generator().manual_seed(seed), speculative=spec)[0]
        for spec in (False, True):
            assert run(5, spec) == run(5, spec)
    assert run(5, True) != run(6, True)  # the random model: the seed matters


def test_speculative_sampling_keeps_head_1_distribution(cyclic_model):
    model, _ = cyclic_model
    prompt, temp, n = [3, 1, 4], 2.0, 3000
    with torch.no_grad():  # exact distribution of the 2nd generated token under head 1 alone
        p1 = probs_from(model.logits(model(torch.tensor([prompt])).hidden[0, 0, -1]), temp, 0, 1.0)
        seqs = torch.tensor([prompt + [x] for x in range(V)])
        p2_given = probs_from(model.logits(model(seqs).hidden[0, :, -1]), temp, 0, 1.0)  # (V, V)
        exact = p1 @ p2_given
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(V)
    for _ in range(n):
        ids, _ = generate(model, prompt, 2, temperature=temp, gen=gen, speculative=True)
        counts[ids[1]] += 1
    tv = 0.5 * (counts / n - exact).abs().sum().item()
    assert tv < 0.05, (tv, exact, counts / n)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    subprocess.run([sys.executable, "train.py", f"--out_dir={out}", "--max_iters=2", "--seq_len=64", "--n_embd=32",
                    "--n_layer=1", "--batch_size=2", "--eval_iters=1"], cwd=HERE, check=True, capture_output=True,
                   timeout=300)
    return out


def sample_cli(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=HERE, capture_output=True, text=True, timeout=300)


def test_cli_end_to_end(trained_dir):
    r = sample_cli(f"--out_dir={trained_dir}", "--prompt=import os", "--max_new_tokens=20", "--temperature=0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("import os") and "tokens/s" in r.stderr and "identical to plain greedy: True" in r.stderr
    r = sample_cli(f"--out_dir={trained_dir}", "--prompt=")
    assert r.returncode == 2 and "empty prompt" in r.stderr
    r = sample_cli(f"--out_dir={trained_dir}", "--prompt=" + "x " * 80)
    assert r.returncode == 2 and "the model's context is seq_len=64" in r.stderr
    r = sample_cli(f"--out_dir={trained_dir / 'nothing'}")
    assert r.returncode == 2 and "no good checkpoint" in r.stderr


def test_cli_incompatible_checkpoint(tmp_path):
    import train
    train.save_checkpoint(tmp_path, 1, dict(model={"w": torch.zeros(3)}, step=1, config={"n_embd": 8}), None, keep=1)
    r = sample_cli(f"--out_dir={tmp_path}")
    assert r.returncode == 2 and "not a model checkpoint of this train.py" in r.stderr
