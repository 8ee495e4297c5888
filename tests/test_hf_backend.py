"""attn_implementation="theria" in transformers: tiny random-init models built from configs (nothing
downloaded), in float64, against transformers' eager backend and against theria's reference
backend (the same masks in plain torch, exact in float64; eager takes its softmax in float32, so
against eager the bound is 1e-6). Padded query rows output zeros on theria (as transformers'
flash-attention backends give them), so outputs are compared on the valid tokens. Models, token
ids and masks live on tests/_device.py's DEVICE (drawn on the CPU, so the same on every machine)."""

from __future__ import annotations

import copy

import pytest
import torch

from _device import DEVICE

transformers = pytest.importorskip("transformers")

from theria_torch import hf  # noqa: E402

FUSED, REFERENCE = hf.register("theria"), hf.register("theria_reference", backend="reference")
B, T, VOCAB = 2, 6, 32
RIGHT_PADDING = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
LEFT_PADDING = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
NO_PADDING = torch.ones(B, T, dtype=torch.long)     # one dense call, no packed sequences


def _config(family: str, **overrides):
    """A one-layer model (two for Gemma-2, whose layers alternate sliding and full attention) with
    grouped-query heads: 2 query heads sharing 1 key/value head, of dim 8."""
    sizes = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=8, num_hidden_layers=2 if family == "gemma2" else 1, max_position_embeddings=64,
                 use_cache=False)
    if family == "mistral":
        return transformers.MistralConfig(**sizes, sliding_window=3, **overrides)
    if family == "gemma2":   # layers alternate sliding (window 3) and full attention
        return transformers.Gemma2Config(**sizes, sliding_window=3, query_pre_attn_scalar=8,
                                         final_logit_softcapping=None, **{"attn_logit_softcapping": None, **overrides})
    return transformers.LlamaConfig(**sizes, **overrides)


def _models(config, implementations):
    """One model per attention implementation, all with the same random weights."""
    torch.manual_seed(0)
    models = {}
    for implementation in implementations:
        model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=implementation,
                                                              dtype=torch.float64).to(DEVICE)
        if models:
            model.load_state_dict(next(iter(models.values())).state_dict())
        models[implementation] = model
    return models


def _tokens(padding):
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, T)).to(DEVICE)
    labels = torch.where(padding.to(DEVICE).bool(), ids, -100)    # padded tokens carry no loss
    return ids, labels


# (family, padding, what transformers compares with): eager in float64 fills the rows of
# left-padded queries with NaN (every key masked), so left padding is compared with sdpa.
FAMILIES = {
    "llama, right padding": ("llama", RIGHT_PADDING, "eager"),
    "mistral sliding window, left padding": ("mistral", LEFT_PADDING, "sdpa"),
    "gemma2 sliding and full layers, no padding": ("gemma2", NO_PADDING, "eager"),
}


@pytest.mark.parametrize("case", FAMILIES, ids=list(FAMILIES))
def test_families_match_transformers(case, one_torch_thread):
    family, padding, theirs = FAMILIES[case]
    padding = padding.to(DEVICE)
    models = _models(_config(family), (theirs, REFERENCE, FUSED))
    ids, labels = _tokens(padding)
    valid = padding.bool()
    results = {}
    for name, model in models.items():
        output = model(ids, attention_mask=padding, labels=labels)
        grads = torch.autograd.grad(output.loss, list(model.parameters()))
        results[name] = (output.logits[valid].detach(), grads)
    for name, bound in ((REFERENCE, 1e-10), (theirs, 1e-6)):
        logits, grads = results[name]
        assert (results[FUSED][0] - logits).abs().max() < bound, name
        assert max((a - b).abs().max() for a, b in zip(results[FUSED][1], grads)) < bound, name


def _meta_gradient(model, support, query, inner_lr=0.5):
    """Full second-order MAML: one inner step on the support set, the query loss of the adapted
    parameters, differentiated through the inner step."""
    names, params = zip(*model.named_parameters())

    def loss(weights, batch):
        ids, padding, labels = batch
        return torch.func.functional_call(model, dict(zip(names, weights)), (ids,),
                                          {"attention_mask": padding, "labels": labels}).loss

    grads = torch.autograd.grad(loss(params, support), params, create_graph=True)
    adapted = [p - inner_lr * g for p, g in zip(params, grads)]
    return torch.autograd.grad(loss(adapted, query), params)


def test_maml_meta_gradient_through_llama(one_torch_thread):
    models = _models(_config("llama"), (FUSED, REFERENCE, "eager"))
    ids, labels = _tokens(RIGHT_PADDING)
    support = (ids, RIGHT_PADDING.to(DEVICE), labels)
    torch.manual_seed(2)
    query_ids = torch.randint(0, VOCAB, (B, T)).to(DEVICE)
    query_padding = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], device=DEVICE)
    query = (query_ids, query_padding, torch.where(query_padding.bool(), query_ids, -100))
    meta = {name: _meta_gradient(model, support, query) for name, model in models.items()}
    scale = max(g.abs().max() for g in meta[REFERENCE])
    for name, bound in ((REFERENCE, 1e-10), ("eager", 1e-6)):
        assert max((a - b).abs().max() for a, b in zip(meta[FUSED], meta[name])) < bound * scale, name


def test_gemma2_logit_softcapping_on_the_fused_kernels(one_torch_thread):
    """Gemma-2's attn_logit_softcapping reaches the fused kernels as flash_attn's softcap: logits
    against the reference backend and eager, and a full second-order MAML meta-gradient (through
    the cap's second derivative) against the reference backend."""
    models = _models(_config("gemma2", attn_logit_softcapping=5.0), ("eager", REFERENCE, FUSED))
    ids, labels = _tokens(RIGHT_PADDING)
    padding = RIGHT_PADDING.to(DEVICE)
    valid = padding.bool()
    logits = {name: model(ids, attention_mask=padding).logits[valid] for name, model in models.items()}
    assert (logits[FUSED] - logits[REFERENCE]).abs().max() < 1e-10
    assert (logits["eager"] - logits[REFERENCE]).abs().max() < 1e-6
    support = (ids, padding, labels)
    torch.manual_seed(3)
    query_ids = torch.randint(0, VOCAB, (B, T)).to(DEVICE)
    query = (query_ids, padding, torch.where(valid, query_ids, -100))
    meta = {name: _meta_gradient(models[name], support, query) for name in (FUSED, REFERENCE)}
    scale = max(g.abs().max() for g in meta[REFERENCE])
    assert max((a - b).abs().max() for a, b in zip(meta[FUSED], meta[REFERENCE])) < 1e-10 * scale


def test_masks_it_cannot_run_raise():
    model = _models(_config("llama"), (FUSED,))[FUSED]
    ids, _ = _tokens(RIGHT_PADDING)
    # Two sequences packed into each row (position_ids restart): a block-diagonal mask.
    packed_positions = torch.tensor([[0, 1, 2, 0, 1, 2]] * B, device=DEVICE)
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        model(ids, position_ids=packed_positions)
    with pytest.raises(ValueError, match="2D attention_mask"):
        model(ids, attention_mask=torch.ones(B, 1, T, T, dtype=torch.bool, device=DEVICE))
