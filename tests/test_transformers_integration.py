"""attn_implementation="minikernels" in Hugging Face models: the same logits, gradients and generated
tokens as "sdpa", with and without padding, and a clear error for what the backend cannot do.

Tiny models with random weights (no download): Llama and Qwen2, grouped-query heads (4 query heads,
2 key/value heads), two layers, float32, short sequences (the kernels run in Triton's interpreter on
the CPU); Mistral for its sliding window, BART for encoder-decoder attention."""

import collections
import copy

import pytest
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    BartConfig,
    BartForConditionalGeneration,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    StaticCache,
)

import minikernels as mk
import minikernels.integrations.transformers as mk_hf
from minikernels.testing import rel_error, tolerance

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
FAMILIES = {"llama": LlamaConfig, "qwen2": Qwen2Config}
DEVICE = mk.device()  # the CPU under the interpreter, the GPU where there is one
FP32_BOUND = tolerance(torch.float32)  # the package's float32 bound (two float32 runs of one model differ by ~1e-7)


@pytest.fixture(autouse=True, scope="module")
def registered():
    mk_hf.register()


def pair(family: str, seed: int = 0, implementation: str = "minikernels", **overrides):
    """The same random model twice: with "sdpa", and with ``implementation``."""
    config = FAMILIES[family](**{**TINY, **overrides})
    torch.manual_seed(seed)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").float()
    # each model gets its own config: from_config writes the implementation into the config it is given
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=implementation).float()
    ours.load_state_dict(ref.state_dict())
    return ref.to(DEVICE), ours.to(DEVICE)


def tokens(batch: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, n), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def padding_mask(batch: int, n: int, padding: str | None) -> torch.Tensor | None:
    """Row 0 full; the other rows shorter by 3, 5, ... tokens, padded on the left or on the right."""
    if padding is None:
        return None
    mask = torch.ones(batch, n, dtype=torch.long)
    for b in range(1, batch):
        short = 1 + 2 * b
        if padding == "left":
            mask[b, :short] = 0
        else:
            mask[b, n - short:] = 0
    return mask.to(DEVICE)


def counted(calls: collections.Counter, varlen: bool = True) -> str:
    """Registers the backend with minikernels' kernels wrapped to count their calls into ``calls`` (so
    that a test cannot pass on sdpa, and sees which kernel each step reached); returns its name.
    ``varlen=False``: padded batches take the per-sequence path."""

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    kernels = mk_hf.Kernels(flash=counting("flash", mk.flash_attention),
                            decode=counting("decode", mk.decode_attention),
                            varlen=counting("varlen", mk.flash_attention_varlen) if varlen else None)
    return mk_hf.register("minikernels-counted" + ("" if varlen else "-per-sequence"), kernels)


@pytest.fixture
def calls():
    return collections.Counter()


def loss_and_grads(model, ids, mask):
    """Next-token cross-entropy of real tokens predicting real tokens, and every gradient. (A label
    follows its position: under left padding the last pad would otherwise predict the first token,
    from an output that is nobody's answer.)"""
    model.zero_grad()
    labels = ids
    if mask is not None:
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def check_against_sdpa(family, padding, implementation="minikernels", batch=3, n=16):
    ref, ours = pair(family, implementation=implementation)
    ids, mask = tokens(batch, n, seed=1), padding_mask(batch, n, padding)
    ref_logits, ref_grads = loss_and_grads(ref, ids, mask)
    logits, grads = loss_and_grads(ours, ids, mask)
    # padded positions carry no token: their logits are nobody's answer (sdpa and flash_attention_2 differ there)
    real = torch.ones(batch, n, dtype=torch.bool, device=DEVICE) if mask is None else mask.bool()
    assert torch.isfinite(logits[real]).all()
    assert rel_error(logits[real], ref_logits[real]) < FP32_BOUND
    assert ref_grads.keys() == grads.keys()
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
        if ref_grads[name].abs().max() == 0:
            assert g.abs().max() == 0, name
        else:
            assert rel_error(g, ref_grads[name]) < FP32_BOUND, name


def test_register_names_an_implementation():
    assert mk_hf.register() == "minikernels"
    assert "minikernels" in transformers.AttentionInterface().valid_keys()
    _, ours = pair("llama")
    assert ours.config._attn_implementation == "minikernels"


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_logits_and_gradients_match_sdpa(family, padding, calls):
    check_against_sdpa(family, padding, counted(calls))
    layers = TINY["num_hidden_layers"]
    assert calls == ({"flash": layers} if padding is None else {"varlen": layers})


def test_per_sequence_path_matches_sdpa(calls):
    """Without the variable-length kernel, a padded batch runs one flash_attention per sequence."""
    check_against_sdpa("llama", "left", counted(calls, varlen=False))
    assert calls == {"flash": TINY["num_hidden_layers"] * 3}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_generation_matches_sdpa(family, calls):
    """A left-padded batch of prompts, 8 new tokens: prefill on the padded path, then decode_attention
    over each sequence's span of real keys in the cache, the batch in one call."""
    ref, ours = pair(family, seed=2, implementation=counted(calls))
    ids, mask = tokens(2, 6, seed=3), padding_mask(2, 6, "left")
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = ref.generate(ids, **kwargs)
    got = ours.generate(ids, **kwargs)
    assert want.shape == (2, 14)
    assert torch.equal(got, want)
    layers = TINY["num_hidden_layers"]
    assert calls["varlen"] == layers  # the prefill
    assert calls["decode"] == 7 * layers  # 7 decode steps, each layer, the padded batch at once


def test_decode_step_over_keys_with_a_hole_decodes_each_sequence_alone(calls):
    """A cached sequence whose real keys are not one span (a gap inside the row): the decode step runs
    each sequence alone over its real keys, equal to SDPA."""
    ref, ours = pair("llama", seed=6, implementation=counted(calls))
    ids = tokens(2, 10, seed=7)
    mask = torch.ones(2, 10, dtype=torch.long, device=DEVICE)
    mask[1, 3:5] = 0
    logits = []
    with torch.no_grad():
        for model in (ref, ours):
            prefill = model(input_ids=ids[:, :9], attention_mask=mask[:, :9], use_cache=True)
            step = model(input_ids=ids[:, 9:], attention_mask=mask, past_key_values=prefill.past_key_values)
            logits.append(step.logits)
    assert rel_error(logits[1], logits[0]) < FP32_BOUND
    assert calls["decode"] == TINY["num_hidden_layers"] * 2  # each layer, each sequence


def test_unpadded_generation_decodes_the_batch_at_once(calls):
    ref, ours = pair("llama", seed=4, implementation=counted(calls))
    ids = tokens(2, 5, seed=5)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **kwargs), ref.generate(ids, **kwargs))
    assert calls == {"flash": 2, "decode": 3 * 2}


def test_padding_helper_reads_any_mask():
    """Spans and packed indices of a mask with a hole (no generate makes one, but a user may)."""
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)
    p = mk_hf._read_padding(mask, 2)
    assert p.key_cu == [0, 4, 6, 8] and p.query_cu == [0, 2, 4, 5]
    assert p.key_spans == [(0, 4), (2, 4), None] and p.query_spans == [(0, 2), (0, 2), (0, 1)]
    assert p.cu_seqlens_k.dtype == torch.int32 and p.cu_seqlens_k.tolist() == [0, 4, 6, 8]
    assert p.key_cols.tolist() == [0, 1, 2, 3, 2, 3, 0, 2] and not p.all_real


@pytest.mark.parametrize("varlen", [True, False])
def test_mask_with_a_hole_matches_sdpa(varlen, calls):
    """A padding mask with a gap inside a row: both the packed and the per-sequence path drop exactly
    the masked keys."""
    ref, ours = pair("llama", seed=6, implementation=counted(calls, varlen))
    ids = tokens(2, 10, seed=7)
    mask = torch.ones(2, 10, dtype=torch.long, device=DEVICE)
    mask[1, 3:5] = 0
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel_error(got[real], want[real]) < FP32_BOUND
    assert calls == ({"varlen": 2} if varlen else {"flash": 4})


def prefill_and_step(model, ids, cache_length, cache_config=None):
    """Logits of a prompt and of one more token, on a StaticCache of ``cache_length`` slots and with no
    attention_mask: the cache hands every slot to attention, filled or not."""
    cache = StaticCache(config=cache_config or model.config, max_cache_len=cache_length)
    with torch.no_grad():
        prompt = model(input_ids=ids, past_key_values=cache).logits
        step = model(input_ids=ids[:, -1:], past_key_values=cache).logits
    return prompt, step


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")  # renamed `cache` in transformers 5
def test_static_cache_without_mask_matches_sdpa(calls):
    """Only the filled slots are keys: the prompt's 10 of 32, then 11 for the next token."""
    ref, ours = pair("llama", seed=8, implementation=counted(calls))
    ids = tokens(2, 10, seed=9)
    for want, got in zip(prefill_and_step(ref, ids, 32), prefill_and_step(ours, ids, 32)):
        assert rel_error(got, want) < FP32_BOUND
    layers = TINY["num_hidden_layers"]
    assert calls == {"flash": layers, "decode": layers}  # the batch at once: every sequence fills the same slots


def mistral_pair(window: int):
    config = MistralConfig(**TINY, sliding_window=window)
    torch.manual_seed(10)
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").float()
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="minikernels").float()
    ours.load_state_dict(ref.state_dict())
    return ref.to(DEVICE), ours.to(DEVICE)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_sliding_window_counts_filled_cache_slots_only():
    """A static cache longer than the window (layers of full length: a cache built without the window)
    is not refused for a prompt the window does not reach; a prompt longer than the window is."""
    ref, ours = mistral_pair(window=16)
    full_length_layers = MistralConfig(**TINY)  # no sliding_window: 32 slots per layer
    ids = tokens(2, 10, seed=11)
    for want, got in zip(prefill_and_step(ref, ids, 32, full_length_layers),
                         prefill_and_step(ours, ids, 32, full_length_layers)):
        assert rel_error(got, want) < FP32_BOUND
    with pytest.raises(NotImplementedError, match="sliding-window"):
        prefill_and_step(ours, tokens(2, 20, seed=11), 32, full_length_layers)


BART_TINY = dict(vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
                 dropout=0.0)


def bart_pair(implementation: str):
    """A tiny BART twice (sdpa, and ``implementation``), and an encoder batch whose row 1 is padded at 8..11."""
    config = BartConfig(**BART_TINY)
    torch.manual_seed(12)
    ref = BartForConditionalGeneration(copy.deepcopy(config)).float().eval()
    ref.set_attn_implementation("sdpa")
    ours = BartForConditionalGeneration(copy.deepcopy(config)).float().eval()
    ours.load_state_dict(ref.state_dict())
    ours.set_attn_implementation(implementation)
    mask = torch.ones(2, 12, dtype=torch.long, device=DEVICE)
    mask[1, 8:] = 0
    return ref.to(DEVICE), ours.to(DEVICE), tokens(2, 12, seed=13), mask


def test_cross_attention_over_a_padded_encoder_batch_matches_sdpa(calls):
    """BART: the decoder's queries attend to the encoder's real tokens. The key mask is the encoder's, so
    no query is padding there; the encoder's own padded positions attend to its real tokens, as in sdpa."""
    ref, ours, ids, mask = bart_pair(counted(calls))
    kwargs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=tokens(2, 5, seed=14))
    with torch.no_grad():
        want, got = ref(**kwargs), ours(**kwargs)
    assert rel_error(got.logits, want.logits) < FP32_BOUND
    assert rel_error(got.encoder_last_hidden_state, want.encoder_last_hidden_state) < FP32_BOUND
    # encoder self-attention and cross-attention take the padded path; the decoder's own attention has no padding
    assert calls == {"varlen": 2, "flash": 1}


def test_encoder_decoder_generation_matches_sdpa(calls):
    """Decode steps of cross-attention: decode_attention over each sequence's real encoder tokens."""
    ref, ours, ids, mask = bart_pair(counted(calls))
    kwargs = dict(attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
    want, got = ref.generate(ids, **kwargs), ours.generate(ids, **kwargs)
    assert len(got.logits) == len(want.logits) == 4
    for step, (g, w) in enumerate(zip(got.logits, want.logits)):
        assert rel_error(g, w) < FP32_BOUND, step
    assert torch.equal(got.sequences, want.sequences)
    # every step has one query (the first starts from the decoder's start token): the decoder's own attention
    # over the batch, and cross-attention over each sequence's real encoder tokens (one span: the batch at
    # once); the encoder once, padded
    assert calls == {"varlen": 1, "decode": 4 * (1 + 1)}


# --------------------------------------------------------------------------------------------------
# what the backend cannot do raises, naming the feature
# --------------------------------------------------------------------------------------------------

def test_custom_4d_mask_raises():
    _, ours = pair("llama")
    ids = tokens(1, 8, seed=0)
    custom = torch.ones(1, 1, 8, 8, dtype=torch.bool, device=DEVICE).tril()
    with pytest.raises(NotImplementedError, match="custom attention mask"):
        ours(input_ids=ids, attention_mask=custom)


def test_sliding_window_narrower_than_the_sequence_raises():
    config = MistralConfig(**TINY, sliding_window=8)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="minikernels").to(DEVICE)
    with torch.no_grad():
        model(input_ids=tokens(1, 8, seed=0))  # 8 keys: the window masks nothing
        with pytest.raises(NotImplementedError, match="sliding-window"):
            model(input_ids=tokens(1, 12, seed=0))


def test_dropout_in_training_raises():
    _, ours = pair("llama", attention_dropout=0.1)
    ours.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        ours(input_ids=tokens(1, 8, seed=0))
    ours.eval()  # no dropout at inference: runs
    with torch.no_grad():
        ours(input_ids=tokens(1, 8, seed=0))


def test_packed_sequences_raise():
    """position_ids that restart mark sequences packed into one row: not supported, so not ignored."""
    _, ours = pair("llama")
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]], device=DEVICE)
    for use_cache in [False, True]:  # transformers' mask sees packing only without a cache; the kernels always
        with pytest.raises(NotImplementedError, match="packed sequences"):
            ours(input_ids=tokens(1, 8, seed=0), position_ids=position_ids, use_cache=use_cache)


def test_attention_weights_are_not_returned_silently():
    _, ours = pair("llama")
    with pytest.raises(NotImplementedError, match="output_attentions"):
        ours(input_ids=tokens(1, 8, seed=0), output_attentions=True)


# --------------------------------------------------------------------------------------------------
# GPU: bfloat16, where the kernels run on tensor cores
# --------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_bf16_on_gpu_is_as_close_to_fp32_as_sdpa(padding):
    """In bfloat16 both backends round: ours must be no further from a float32 sdpa model than sdpa in
    bfloat16 is (with a little slack), for the logits and for the gradients."""
    config = LlamaConfig(**{**TINY, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 512})
    torch.manual_seed(0)
    exact = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").cuda().float()
    results = {}
    for name in ["sdpa", "minikernels"]:
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=name).cuda()
        model.load_state_dict(exact.state_dict())
        results[name] = model.to(torch.bfloat16)
    ids = tokens(3, 300, seed=1).cuda()
    mask = padding_mask(3, 300, padding)
    mask = mask.cuda() if mask is not None else None
    real = torch.ones(3, 300, dtype=torch.bool, device="cuda") if mask is None else mask.bool()
    want, want_grads = loss_and_grads(exact, ids, mask)
    errors = {}
    for name, model in results.items():
        logits, grads = loss_and_grads(model, ids, mask)
        errors[name] = [rel_error(logits[real].float(), want[real])]
        errors[name] += [rel_error(g.float(), want_grads[k]) for k, g in grads.items()
                         if want_grads[k].abs().max() > 0]
    for ours, theirs in zip(errors["minikernels"], errors["sdpa"]):
        assert ours <= 1.5 * theirs + 1e-3, (ours, theirs)
