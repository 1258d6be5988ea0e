"""export_hf.py: a checkpoint as a Hugging Face transformers folder, checked against model.py before it is kept.

    python export_hf.py --out_dir=out --to=hf_model                  # the newest good checkpoint of out/
    python export_hf.py --ckpt=out/ckpt_0000240.pt --to=hf_model --overwrite=True

The folder loads offline with `AutoModelForCausalLM.from_pretrained(folder)` and
`AutoTokenizer.from_pretrained(folder)`: config.json, model.safetensors, generation_config.json, the GPT-2
tokenizer (tokenizer.json and tokenizer_config.json, derived from gpt2.tiktoken: nothing is downloaded),
mtp_heads.safetensors + mtp_heads.json (heads 2..n_predict, which no transformers architecture holds: blocks
of the parallel style, DeepSeek-V3 depths of the sequential one, nothing for shared logits; load_mtp_heads() and
mtp_logits() below run them) and a short README.md. The exported model is the trunk and head 1: a next-token
language model. The folder is written beside --to under a temporary name; transformers loads it back and its
logits (every head's) are compared with ours on a fixed text; only then is it renamed to --to, so an export that
does not compute what model.py computes is never left there (`--verify=False` skips the comparison).

The target: transformers' Qwen2-MoE (Qwen2MoeForCausalLM). Of the MoE architectures of transformers 5 compared
(Mixtral, GraniteMoeShared, Qwen2-MoE), it is the one that computes every setting of ModelConfig but the expert
bias, each exactly:
- routing: softmax over the experts, then top-k; `norm_topk_prob` renormalizes the chosen probabilities
  (ours for top_k > 1) or keeps them raw (ours for top_k = 1). Mixtral always renormalizes (a single expert's
  gate would be 1.0) and has neither shared experts nor dense layers; GraniteMoeShared has our ungated shared
  MLP but a softmax over the top-k logits (again 1.0 for top_k = 1), no dense layers, and extra multipliers.
- dense layers anywhere through `mlp_only_layers` (dense FFN size `intermediate_size`): our leading
  n_dense_layers, and head 1, which is one more dense block on the trunk: Qwen2-MoE's last decoder layer.
- its shared expert is multiplied by sigmoid(shared_expert_gate(x)), ours by 1: a zero gate weight makes the
  sigmoid exactly 0.5 and the shared expert's down projection is doubled, and a power of two scales exactly.
  n_shared_experts = 0 exports a shared expert of 16 zero rows (ZERO_SHARED), whose output is exactly 0 (one
  of size 0 has no weights, and transformers reports them missing at every load).
- rotate-half RoPE over position ids with `rope_theta`, RMSNorm eps 1e-6, grouped-query attention, q/k/v
  biases of zero (`qkv_bias=True`: vLLM's Qwen2-MoE always has them), tied or untied unembedding, the padded
  vocabulary (50304 logits, as ours; the tokenizer has GPT-2's 50257 ids and generation_config.json
  suppresses the 47 padding ids, as sample.py does).
Weights are written one expert at a time (mlp.experts.<e>.gate_proj/up_proj/down_proj), the layout of the
Qwen2-MoE checkpoints on the Hub, which transformers 5 stacks as it loads and vLLM reads as is.
Not expressible, refused: a nonzero expert bias (DeepSeek-V3's aux-loss-free balancing, trained with
bias_update_rate > 0) shifts which experts are chosen and Qwen2-MoE has no such term.

ModelConfig -> config.json: vocab_size -> vocab_size; seq_len -> max_position_embeddings (transformers does
not stop there: past seq_len the model runs on positions it never saw); n_layer -> num_hidden_layers - 1
(+ head 1); n_head -> num_attention_heads; n_kv_head (0: n_head) -> num_key_value_heads; n_embd ->
hidden_size; n_experts -> num_experts; top_k -> num_experts_per_tok and norm_topk_prob = top_k > 1;
n_shared_experts * ffn_hidden -> shared_expert_intermediate_size; ffn_hidden (expert_hidden or its default)
-> moe_intermediate_size; 4 * n_embd * 2 // 3 (model.py's dense SwiGLU) -> intermediate_size;
n_dense_layers -> mlp_only_layers; n_predict -> mtp_heads.json; tie_embeddings -> tie_word_embeddings;
rope_base -> rope_parameters.rope_theta (and rope_theta, where transformers 4 reads it); aux_loss_coef ->
router_aux_loss_coef (read only when fine-tuning with output_router_logits, and not our loss: transformers
pools the layers' statistics before the product and counts top_k assignments per token). Training-only, with no
counterpart: dropout (residual dropout; transformers' attention_dropout is another thing and stays 0),
router_noise, z_loss_coef; attn_backend and moe_backend are ours to choose.
"""
import functools
import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from checkpoint import load_model
from data import EOT, GPT2_VOCAB, get_tokenizer
from model import Block, MoE
from settings import parse_config

DEFAULTS = dict(
    out_dir="out",  # where train.py wrote its checkpoints
    ckpt="",  # a checkpoint file; "" means the newest good one in out_dir
    to="hf_model",  # the folder to write: new or empty, or an earlier export with --overwrite=True
    overwrite=False,  # replace --to if it holds an earlier export
    verify=True,  # load the folder back with transformers and compare its logits with ours before keeping it
)
# largest |logit difference| the check at export accepts: float32 summed in other orders gave 1e-5 to 2e-5 on the
# default model (logits up to 11), a wrong convention gives more than 1 (test_export.py)
VERIFY_TOL = 1e-3
HEADS_FILE, HEADS_JSON = "mtp_heads.safetensors", "mtp_heads.json"
ZERO_SHARED = 16  # intermediate size of the all-zero shared expert of a model without one (splits over 16 GPUs)
HEADS_HOW = dict(  # mtp_heads.json's account of each style (ModelConfig.mtp_style)
    parallel="head k (k >= 2): heads.<k-2>.* are the parameters of a dense Qwen2MoeDecoderLayer (config.json's "
             "sizes), run on the input of the model's last decoder layer (outputs.hidden_states[-2] of a forward "
             "with output_hidden_states=True) with that layer's attention mask and positions, then model.norm and "
             "lm_head",
    sequential="head k (k >= 2, DeepSeek-V3 depth k-1): s_1 = the output of the model's last decoder layer before "
               "model.norm; s_k = block(merge(concat(norm_h(s_{k-1}), norm_e(embed(token t+k-1))))) with "
               "heads.<k-2>.norm_h / norm_e (RMSNorm, eps 1e-6), merge (2D -> D, no bias) and block.* (a dense "
               "Qwen2MoeDecoderLayer, run with the last layer's attention mask and positions); the embedding is "
               "model.embed_tokens', and zero where token t+k-1 is not in t's text (past its end); logits = "
               "lm_head(model.norm(s_k))",
    shared="no parameters: head k scores head 1's logits at t against token t+k",
)


class ExportMismatch(RuntimeError):
    """The written folder does not compute what our model computes: a bug of this script, not the user's."""


def import_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is read from local folders: never the network
    try:
        import safetensors.torch  # noqa: F401  (a dependency of transformers)
        import transformers
    except ImportError as e:
        raise ValueError(f"export_hf.py needs transformers and safetensors ({e}); "
                         "pip install transformers safetensors") from None
    return transformers


# ----------------------------------------------------------------------------- settings and weights

def check_exportable(model, path):
    """ValueError naming what Qwen2-MoE cannot compute, with the values."""
    cfg = model.cfg
    for i, m in enumerate(model.blocks):
        if isinstance(m.ffn, MoE) and m.ffn.expert_bias.any() and cfg.top_k < cfg.n_experts:
            b = m.ffn.expert_bias
            raise ValueError(f"checkpoint {path}: block {i}'s expert_bias (aux-loss-free balancing, trained with "
                             f"bias_update_rate > 0) is nonzero (max |b| = {b.abs().max().item():.3g}); it changes "
                             "which experts are chosen and Qwen2-MoE has no such bias, so the export would compute "
                             "another model. Export a model trained with bias_update_rate=0")


def hf_config(cfg):
    """ModelConfig -> the keyword arguments of transformers' Qwen2MoeConfig (the mapping of the docstring)."""
    return dict(
        architectures=["Qwen2MoeForCausalLM"],
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, max_position_embeddings=cfg.seq_len,
        num_hidden_layers=cfg.n_layer + 1,  # + head 1
        num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head or cfg.n_head,
        hidden_act="silu", rms_norm_eps=1e-6, qkv_bias=True, attention_dropout=0.0, use_sliding_window=False,
        rope_parameters=dict(rope_type="default", rope_theta=float(cfg.rope_base)),
        intermediate_size=4 * cfg.n_embd * 2 // 3,  # model.py's dense SwiGLU: leading dense blocks and heads
        mlp_only_layers=list(range(cfg.n_dense_layers)) + [cfg.n_layer],
        decoder_sparse_step=1, num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k,
        norm_topk_prob=cfg.top_k > 1, moe_intermediate_size=cfg.ffn_hidden,
        shared_expert_intermediate_size=cfg.ffn_hidden * cfg.n_shared_experts or ZERO_SHARED,
        router_aux_loss_coef=cfg.aux_loss_coef, output_router_logits=False,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=EOT, eos_token_id=EOT, pad_token_id=None,
        initializer_range=0.02, dtype="float32",
    )


def block_tensors(block, cfg):
    """One of our Blocks -> {Qwen2MoeDecoderLayer parameter name: tensor}, experts one by one (the layout of
    Qwen2-MoE checkpoints on the Hub: transformers 5 stacks them as it loads, vLLM reads them as they are)."""
    H, KV, hd = block.attn.H, block.attn.KV, block.attn.hd
    q, k, v = block.attn.qkv.weight.split([H * hd, KV * hd, KV * hd])  # rows of the fused projection
    out = {"input_layernorm.weight": block.norm1.weight, "post_attention_layernorm.weight": block.norm2.weight,
           "self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v,
           "self_attn.o_proj.weight": block.attn.proj.weight,
           # zero biases: exact (x + 0 = x), and vLLM's Qwen2-MoE attention always has them
           "self_attn.q_proj.bias": torch.zeros(H * hd), "self_attn.k_proj.bias": torch.zeros(KV * hd),
           "self_attn.v_proj.bias": torch.zeros(KV * hd)}
    f = block.ffn
    if not isinstance(f, MoE):
        return out | {"mlp.gate_proj.weight": f.w1.weight, "mlp.up_proj.weight": f.w3.weight,
                      "mlp.down_proj.weight": f.w2.weight}
    out |= {"mlp.gate.weight": f.router.weight, "mlp.shared_expert_gate.weight": torch.zeros(1, cfg.n_embd)}
    for e in range(cfg.n_experts):
        out |= {f"mlp.experts.{e}.gate_proj.weight": f.w1_EFD[e], f"mlp.experts.{e}.up_proj.weight": f.w3_EFD[e],
                f"mlp.experts.{e}.down_proj.weight": f.w2_EDF[e]}  # (F, D), (F, D), (D, F): nn.Linear's layout
    if f.shared is not None:
        return out | {"mlp.shared_expert.gate_proj.weight": f.shared.w1.weight,
                      "mlp.shared_expert.up_proj.weight": f.shared.w3.weight,
                      "mlp.shared_expert.down_proj.weight": 2 * f.shared.w2.weight}  # times sigmoid(0) = 0.5: ours
    zero = torch.zeros(ZERO_SHARED, cfg.n_embd)  # no shared expert: one that adds exactly 0 (silu(0) * 0 = 0)
    return out | {"mlp.shared_expert.gate_proj.weight": zero, "mlp.shared_expert.up_proj.weight": zero,
                  "mlp.shared_expert.down_proj.weight": zero.t()}


def head_tensors(head, cfg):
    """One of heads 2..n -> {name: tensor}. Parallel style: a block, in Qwen2MoeDecoderLayer's names. Sequential
    style (a DeepSeek-V3 depth): the norms of the previous head's state and of the read token's embedding, the
    2D -> D merge projection, then its block in Qwen2MoeDecoderLayer's names under `block.`."""
    if isinstance(head, Block):
        return block_tensors(head, cfg)
    return {"norm_h.weight": head.norm_h.weight, "norm_e.weight": head.norm_e.weight,
            "merge.weight": head.merge.weight} | {f"block.{k}": t for k, t in block_tensors(head.block, cfg).items()}


def hf_state_dict(model):
    """Our model -> (Qwen2MoeForCausalLM's weights, the MTP heads' weights), float32, contiguous, unshared."""
    cfg = model.cfg
    sd = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm_f.weight}
    for i, block in enumerate(list(model.blocks) + [model.heads[0]]):  # head 1 is the last decoder layer
        sd |= {f"model.layers.{i}.{k}": t for k, t in block_tensors(block, cfg).items()}
    if not cfg.tie_embeddings:  # tied: transformers ties lm_head to embed_tokens itself
        sd["lm_head.weight"] = model.lm_head.weight
    heads = {f"heads.{j}.{k}": t for j, head in enumerate(model.heads[1:]) for k, t in head_tensors(head, cfg).items()}
    own = lambda d: {k: t.detach().to("cpu", torch.float32).clone().contiguous() for k, t in d.items()}
    return own(sd), own(heads)


# ----------------------------------------------------------------------------- tokenizer

def bytes_to_unicode():
    """GPT-2's byte-level alphabet: each byte as a printable character (vocab.json spells tokens in it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=1)
def vocab_and_merges(enc):
    """tiktoken ranks -> (vocab {token: id}, merges [(left, right)] in rank order), in GPT-2's byte-level spelling.
    A token of rank r is the merge of the two parts that byte-pair encoding with the merges of rank < r leaves
    of it (tiktoken applies merges by rank, so those parts are what the tokenizer joins last)."""
    ranks = {b: enc.encode_single_token(b) for b in enc.token_byte_values()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(token) > 1:
            if len(parts) != 2:
                raise ValueError(f"gpt2.tiktoken: token {token!r} (rank {rank}) is not one merge of two lower ranks")
            merges.append(parts)
    spell = bytes_to_unicode()
    word = lambda b: "".join(spell[x] for x in b)
    vocab = {word(b): r for b, r in ranks.items()} | {"<|endoftext|>": EOT}
    return vocab, [(word(a), word(b)) for a, b in merges]


def write_tokenizer(folder, seq_len):
    """GPT-2's tokenizer from gpt2.tiktoken. It adds <|endoftext|> in front of a text, as every training document
    begins (data.py), so `tokenizer(text)` gives the ids the model saw; add_special_tokens=False leaves it out."""
    from transformers import GPT2Tokenizer
    vocab, merges = vocab_and_merges(get_tokenizer())
    tok = GPT2Tokenizer(vocab=vocab, merges=merges, add_bos_token=True, pad_token="<|endoftext|>",
                        model_max_length=seq_len)
    tok.save_pretrained(folder)
    # tokenizer.json's post-processor adds it; the config says so too, for readers that only read the config
    path = Path(folder) / "tokenizer_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"add_bos_token": True}, indent=2) + "\n")


# ----------------------------------------------------------------------------- the folder

def write_export(model, folder, source):
    """Every file of the export into folder (which exists and is empty)."""
    transformers = import_transformers()
    from safetensors.torch import save_file

    def save(tensors, path):  # safetensors creates its files owner-only (0600); readable like the json beside them
        save_file(tensors, str(path), metadata={"format": "pt"})
        mask = os.umask(0)
        os.umask(mask)
        path.chmod(0o666 & ~mask)
    cfg = model.cfg
    sd, heads = hf_state_dict(model)
    transformers.Qwen2MoeConfig(**hf_config(cfg)).save_pretrained(folder)
    path = Path(folder) / "config.json"  # the RoPE base also where transformers 4 and the tools built on it look
    path.write_text(json.dumps(json.loads(path.read_text()) | {"rope_theta": float(cfg.rope_base)}, indent=2) + "\n")
    save(sd, Path(folder) / "model.safetensors")
    suppress = list(range(GPT2_VOCAB, cfg.vocab_size))  # the vocabulary's padding ids: never produced (sample.py)
    transformers.GenerationConfig(bos_token_id=EOT, eos_token_id=EOT, pad_token_id=EOT,
                                  suppress_tokens=suppress or None).save_pretrained(folder)
    write_tokenizer(folder, cfg.seq_len)
    style = getattr(cfg, "mtp_style", "parallel")
    if heads:
        save(heads, Path(folder) / HEADS_FILE)
    if cfg.n_predict > 1:
        (Path(folder) / HEADS_JSON).write_text(json.dumps(dict(
            what="multi-token-prediction heads 2..n_predict of the exported model, for drafting; head 1 is the "
                 "model itself (its last decoder layer, then model.norm and lm_head)",
            style=style, heads=cfg.n_predict - 1, predicts=[f"token t+{k}" for k in range(2, cfg.n_predict + 1)],
            how=HEADS_HOW[style], weights=HEADS_FILE if heads else None,
            loader="export_hf.load_mtp_heads(folder, hf_model), then export_hf.mtp_logits(hf_model, heads, input_ids)",
            source=source, model_config=asdict(cfg)), indent=1) + "\n")
    (Path(folder) / "README.md").write_text(
        f"# MoE language model exported by export_hf.py\n\nFrom {source['checkpoint']} (step {source['step']}): "
        "the trunk and the next-token head of the trained model, as Qwen2MoeForCausalLM. Every text begins with "
        "<|endoftext|>, as in training (the tokenizer adds it).\n"
        + (f"\nHeads 2..{cfg.n_predict} (multi-token prediction, {style} style, for drafting) are described in "
           f"{HEADS_JSON}.\n" if cfg.n_predict > 1 else ""))


def check_text():
    """A fixed text to compare on: this file's source (Python, like the default corpus), without the literal
    end-of-text marker, which transformers' tokenizer reads as the special token and tiktoken's
    encode_ordinary (data.py) as plain text."""
    return Path(__file__).read_text(encoding="utf-8").replace("<|endoftext|>", "")


@torch.no_grad()
def verify_export(model, folder):
    """Load folder with transformers (float32, eager attention and experts: the reference implementations) ->
    (the largest |logit difference| from ours over every head on a fixed text, its number of tokens): head 1
    from the model, heads 2.. from the MTP heads file. ExportMismatch if the tokenizer disagrees with
    data.get_tokenizer() or a weight is missing or unused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()  # a progress bar per weight file: noise in a script's output
    text = check_text()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = [EOT] + get_tokenizer().encode_ordinary(text)
    theirs = tok(text, verbose=False)["input_ids"]
    if theirs != ids:
        first = next((i for i, (a, b) in enumerate(zip(theirs, ids)) if a != b), min(len(ids), len(theirs)))
        raise ExportMismatch(f"the exported tokenizer differs from gpt2.tiktoken at token {first} of the check text")
    hf, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                    experts_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise ExportMismatch(f"transformers loaded the export with {bad}")
    x = torch.tensor([ids[:model.cfg.seq_len]])
    heads = load_mtp_heads(folder, hf) if (Path(folder) / HEADS_FILE).exists() else []
    ours = model.logits(model(x).hidden)  # (n_predict, 1, T, vocab)
    return (ours - mtp_logits(hf, heads, x)).abs().max().item(), x.shape[1]


def check_target(to, overwrite):
    """Before anything is loaded: --to must be new, an empty folder, or (with overwrite) an earlier export."""
    to = Path(to)
    if to.exists() and not to.is_dir():
        raise ValueError(f"--to={str(to)!r} is a file, expected a folder to create")
    if to.is_dir() and any(to.iterdir()):
        if not overwrite:
            raise ValueError(f"--to={str(to)!r} exists and is not empty; use another folder, or --overwrite=True "
                             "to replace an earlier export")
        if not (to / "config.json").is_file():
            raise ValueError(f"--to={str(to)!r} holds files but no config.json of an earlier export; refusing to "
                             "replace it, even with --overwrite=True")


def replace_folder(tmp, to):
    """Put the finished folder tmp at to: a rename, so --to holds the old export or the new one, never a part."""
    if to.is_dir() and any(to.iterdir()):
        old = to.with_name(f".old-{to.name}-{os.getpid()}")
        os.replace(to, old)
        try:
            os.replace(tmp, to)
        except OSError:
            os.replace(old, to)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, to)  # rename(2) replaces an empty folder


def main(c):
    check_target(c["to"], c["overwrite"])
    to = Path(os.path.abspath(c["to"]))  # a name to put beside (--to=. has none); symlinks are left as they are
    model, path, state = load_model(c["out_dir"], c["ckpt"], "cpu")
    check_exportable(model, path)
    import_transformers()  # a missing transformers is said before any writing
    print(f"loaded {path} (step {state['step']})", file=sys.stderr)
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = to.with_name(f".tmp-{to.name}-{os.getpid()}")  # beside --to: the final rename stays on one disk
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_export(model, tmp, dict(checkpoint=str(path), step=int(state["step"]), run=str(state.get("run", ""))))
        if c["verify"]:
            diff, n = verify_export(model, tmp)
            if not diff <= VERIFY_TOL:  # also catches NaN
                raise ExportMismatch(f"the exported model's logits differ from ours by up to {diff:.3g} "
                                     f"(> {VERIFY_TOL}) on the check text; nothing was written to {to}")
            print(f"verified: transformers' logits match ours within {diff:.2e} on {n} tokens (all "
                  f"{model.cfg.n_predict} heads)", file=sys.stderr)
        replace_folder(tmp, to)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"exported {path} to {to}/ (Qwen2MoeForCausalLM, head 1 of {model.cfg.n_predict})", file=sys.stderr)
    return to


# ----------------------------------------------------------------------------- using the MTP heads

class SequentialDepth(torch.nn.Module):
    """A sequential (DeepSeek-V3) depth around a Qwen2MoeDecoderLayer: model.py's Depth with transformers' block."""

    def __init__(self, config, block):
        super().__init__()
        D = config.hidden_size
        self.norm_h, self.norm_e = torch.nn.RMSNorm(D, eps=1e-6), torch.nn.RMSNorm(D, eps=1e-6)
        self.merge = torch.nn.Linear(2 * D, D, bias=False)
        self.block = block

    def forward(self, h_BTD, e_BTD, **layer_kwargs):
        return self.block(self.merge(torch.cat([self.norm_h(h_BTD), self.norm_e(e_BTD)], dim=-1)), **layer_kwargs)


def load_mtp_heads(folder, hf_model):
    """mtp_heads.safetensors -> nn.ModuleList of heads 2..n (index i: head i + 2), in eval mode, on hf_model's
    device and dtype; empty where there are none (one head, or shared logits)."""
    from safetensors.torch import load_file
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeDecoderLayer
    path = Path(folder) / HEADS_JSON
    meta = json.loads(path.read_text()) if path.is_file() else dict(style="parallel", heads=0)
    if meta["style"] == "shared" or not meta["heads"]:
        return torch.nn.ModuleList()
    last = hf_model.config.num_hidden_layers - 1  # in mlp_only_layers: dense, like head 1
    block = lambda: Qwen2MoeDecoderLayer(hf_model.config, last)
    make = (lambda: SequentialDepth(hf_model.config, block())) if meta["style"] == "sequential" else block
    heads = torch.nn.ModuleList(make() for _ in range(meta["heads"]))
    weights = load_file(str(Path(folder) / HEADS_FILE))
    heads.load_state_dict({k.removeprefix("heads."): t for k, t in weights.items()}, strict=True)
    p = next(hf_model.parameters())
    return heads.to(p.device, p.dtype).eval()


@torch.no_grad()
def mtp_logits(hf_model, heads, input_ids, attention_mask=None):
    """Logits of every head, (1 + len(heads), B, T, vocab): head 1 is hf_model's own, head k >= 2 predicts token
    t + k (mtp_heads.json's `how`). Each row of input_ids is one text (padding, if any, marked by
    attention_mask). The heads run with the attention mask and rotary embeddings that hf_model's last decoder
    layer got, caught with its input and output by hooks, then the shared final norm and lm_head."""
    seen = {}
    last = hf_model.model.layers[-1]
    hooks = [last.register_forward_pre_hook(lambda m, args, kwargs: seen.update(args=args, kwargs=kwargs),
                                            with_kwargs=True),
             last.register_forward_hook(lambda m, args, output: seen.update(output=output))]
    try:
        out = hf_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    kwargs = {k: v for k, v in seen["kwargs"].items() if k not in ("cache", "past_key_values", "use_cache")}
    h_in = seen["args"][0] if seen["args"] else kwargs.pop("hidden_states")
    kwargs.pop("hidden_states", None)
    unembed = lambda s: hf_model.lm_head(hf_model.model.norm(s))
    logits, state = [out.logits], seen["output"]
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    for k, head in enumerate(heads, start=1):
        if isinstance(head, SequentialDepth):  # depth k reads token t + k, where it is in t's text
            ok = torch.zeros_like(real)
            ok[:, :-k] = real[:, :-k] & real[:, k:]
            ahead = torch.zeros_like(input_ids)
            ahead[:, :-k] = input_ids[:, k:]
            e = torch.where(ok[..., None], hf_model.model.embed_tokens(ahead), 0.0)
            state = head(state, e, **kwargs)
            logits.append(unembed(state))
        else:
            logits.append(unembed(head(h_in, **kwargs)))
    return torch.stack(logits)


def run(argv):
    """The command line -> exit status: 0, or 2 with one `error:` line for anything the user can fix."""
    try:
        main(parse_config(argv, DEFAULTS))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExportMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
