"""engine.py: what exists only for speed and memory. A reader of a method may trust it and skip it.

Each function here equals a plain computation, and a test shows it:
- `generate`, the sampler, equals `model.generate` with the same sampling rule (greedy: token for
  token; tests/test_generation.py), with its own KV cache written in place and each prompt
  prefilled once for all its samples;
- `completion_hidden`, the training forward pass that runs each prompt once for all its
  completions, equals one forward pass per [prompt | completion] row, in value and gradient, with
  and without gradient checkpointing (tests/test_generation.py);
- `chunked_output_layer`, the output layer applied a chunk of positions at a time with its gradient
  taken in the forward pass, and what is built on it (`target_logprobs`, `token_logprobs`,
  `compare_logits_in_chunks`), equal the same losses on the model's full logits, in value and
  gradient (tests/test_fused_losses.py).
Every dependency on transformers internals (its cache classes, decoder and output layer) lives
here. This file imports no file of the project, reads no command-line arguments and prints nothing.
"""
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers.cache_utils import DummyLayer, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

# transformers' KV-cache layers that `completion_hidden` replaces by its own: attention, plain or
# with a sliding window. Besides those, only DummyLayer (a layer that reads another layer's keys and
# values: Gemma 4) is supported, not linear attention or other recurrent state.
ATTENTION_CACHE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)


def unsupported_cache_layers(model):
    """Names of the model's KV-cache layer types that the sampler and training pass cannot handle:
    linear attention, convolutions or other recurrent state (Qwen3-Next, LFM2)."""
    names = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    return sorted(names - {kind.__name__ for kind in (*ATTENTION_CACHE_LAYERS, DummyLayer)})


def keep_cache_in_recomputed_layers(model):
    """Let layers that gradient checkpointing recomputes use a cache (transformers turns it off).
    Safe here: the only cache used with gradients is `completion_hidden`'s, which a recompute reads
    (SharedPromptLayer) or writes the same again (PromptRecorder); `generate` runs without
    gradients, where nothing is recomputed."""
    from transformers.modeling_layers import GradientCheckpointingLayer  # slow: only when needed
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer):
            layer._can_checkpoint_with_cache = True


# ----------------------------------------------------------------------------------------------
# The sampler


def end_token_ids(model, tokenizer):
    """The token ids that end a completion: the tokenizer's EOS and every id of the model's
    generation config (real checkpoints list several: Qwen3 <|im_end|> and <|endoftext|>)."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    return sorted({tokenizer.eos_token_id, *configured} - {None})


def is_end_token(tokens, end_ids):
    """Whether each token is one of end_ids: a bool tensor of tokens' shape. (torch.isin sorts
    through torch.unique beyond a few elements, which waits for the GPU.)"""
    return (tokens[..., None] == end_ids).any(-1)


def sample_next_token(logits, temperature=0.0, top_p=1.0, top_k=0):
    """One token per row from next-token logits [N, V], from exactly the distribution the flags name,
    and its log-probability: (tokens [N], logprobs [N] float32).

    temperature 0: the argmax (greedy). Otherwise p = softmax(logits / temperature), restricted to the
    top_k most likely tokens (0: no restriction), then to the most likely tokens whose total
    probability reaches top_p (nucleus sampling, Holtzman et al. 2019, arXiv 1904.09751; 1: all),
    and renormalised: the order transformers applies them in. Nothing else changes the
    distribution: no repetition penalty or other default from a checkpoint's generation_config.json.

    logprobs: log softmax(logits / temperature) at the drawn token (temperature 1 when greedy),
    before top_k and top_p: what the trainer computes for the same token (`target_logprobs`), so
    the two can be compared. NaN or infinite logits (a diverged model) give a NaN or infinite
    log-probability, which `generate` turns into an error; the token is then still a valid id.
    """
    if temperature == 0:
        tokens = logits.argmax(-1)
    else:
        tokens = inverse_cdf_draw(restrict(logits.float() / temperature, top_p, top_k))
    return tokens, logprobs_of(logits, tokens, temperature or 1.0)


def logprobs_of(logits, targets, temperature=1.0):
    """log softmax(logits / temperature) at each row's target: [n, V], [n] -> [n] float32."""
    scaled = logits.float() / temperature if temperature != 1 else logits.float()
    return scaled.gather(-1, targets[:, None]).squeeze(-1) - scaled.logsumexp(-1)


def restrict(logits, top_p, top_k):
    """logits [N, V] with -inf outside the top_k most likely tokens, then outside the most likely
    tokens whose probability reaches top_p (`sample_next_token`)."""
    if top_k > 0:
        kth_largest = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending
        tail = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p  # least likely, total <= 1 - top_p
        tail[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(tail.scatter(1, order, tail), float("-inf"))  # back in vocab order
    return logits


def inverse_cdf_draw(logits):
    """One token per row of softmax(logits) [N, V], by the inverse CDF in float64 (exact; 40x faster
    than torch.multinomial at V = 151,936 on a CPU): token i where cumulative[i - 1] <= u <
    cumulative[i], so a token of probability 0 never comes. No host sync: a non-finite row (NaN
    total) draws some valid id, never V."""
    cumulative = logits.softmax(-1, dtype=torch.float64).cumsum(-1)  # [N, V]
    total = cumulative[:, -1:]  # [N, 1], 1 up to rounding
    u = torch.minimum(torch.rand(total.shape, dtype=torch.float64, device=total.device) * total,
                      total.nextafter(torch.zeros_like(total)))  # uniform below the total, rounded too
    return torch.searchsorted(cumulative, u, right=True).squeeze(1).clamp_(max=logits.shape[1] - 1)


class PreallocatedLayer(DynamicLayer):
    """One attention layer's KV cache in buffers of [rows, heads, capacity, head_dim], written in
    place. transformers' DynamicLayer concatenates instead, which copies the whole cache at every
    token (a fifth of a small model's sampling time). With `preallocate`, the buffers hold the
    whole rollout (max_length positions) from the first decode step on and never grow; otherwise
    they double when full (up to max_length), so each position is copied about once more in all.
    Buffers are in the values' dtype, the compute dtype: under autocast (--full) the keys come out
    of a float32 norm and RoPE, and would take 1.5x the memory; attention casts them anyway.
    keys / values are views of the first `length` positions: attention sees only those. Only what
    `generate` calls is adapted (update, repeating and selecting rows); DynamicLayer's crop, reset
    and offloading do not know the buffers."""

    def __init__(self, max_length, preallocate=False):
        super().__init__()
        self.max_length, self.preallocate, self.length = max_length, preallocate, 0

    def lazy_initialization(self, key_states, value_states):
        self.key_buffer = key_states[:, :, :0].to(value_states.dtype)
        self.value_buffer = value_states[:, :, :0]
        self.device, self.is_initialized = key_states.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, self.length = self.length, self.length + key_states.shape[-2]
        if self.length > self.key_buffer.shape[2]:  # full: double
            capacity = min(max(2 * self.key_buffer.shape[2], self.length), self.max_length)
            self.reallocate(torch.arange(key_states.shape[0], device=self.device), capacity, start)
        self.key_buffer[:, :, start:self.length] = key_states  # cast to the buffer's dtype
        self.value_buffer[:, :, start:self.length] = value_states
        self.keys = self.key_buffer[:, :, :self.length]  # views: no copy
        self.values = self.value_buffer[:, :, :self.length]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats):
        rows = torch.arange(self.key_buffer.shape[0], device=self.device)
        capacity = self.max_length if self.preallocate else self.key_buffer.shape[2]
        self.reallocate(rows.repeat_interleave(repeats), capacity, self.length)

    def batch_select_indices(self, indices):
        self.reallocate(indices, self.key_buffer.shape[2], self.length)

    def reallocate(self, rows, capacity, filled):
        """New buffers of `capacity` positions holding the first `filled` positions of `rows`."""
        for name in ("key_buffer", "value_buffer"):
            old = getattr(self, name)
            new = old.new_empty(len(rows), old.shape[1], capacity, old.shape[3])
            new[:, :, :filled] = old[rows, :, :filled]
            setattr(self, name, new)
        self.keys = self.key_buffer[:, :, :self.length]
        self.values = self.value_buffer[:, :, :self.length]


def rollout_fits(model, rows, length):
    """Whether a KV cache of `rows` x `length` positions for every layer may be allocated whole:
    on CUDA, if it takes at most half of the memory free there (counted in the weights' dtype:
    twice the cache under --full's autocast, on the safe side); elsewhere always (a CPU commits
    the pages of an allocation only as they are written)."""
    device = model.device
    if device.type != "cuda":
        return True
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    cache_bytes = 2 * config.num_hidden_layers * rows * length * heads * head_dim * model.dtype.itemsize
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) \
        - torch.cuda.memory_allocated(device)  # blocks the allocator holds are free to us
    return cache_bytes <= free / 2


@contextmanager
def sdpa_attention(model):
    """The model with PyTorch's scaled_dot_product_attention while decoding, its own implementation
    back afterwards. Flash Attention 2 in transformers unpads left-padded rows at every layer and
    step (a nonzero and a .item(): two host syncs a layer) and copies the cache view; SDPA takes
    the padding as a mask. Training passes (`completion_hidden`) keep Flash Attention 2, and so
    does decoding a model that has no SDPA path (Gemma 2: its soft cap)."""
    implementation = model.config._attn_implementation
    if implementation.startswith("flash_attention") and getattr(model, "_supports_sdpa", False):
        model.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if model.config._attn_implementation != implementation:
            model.set_attn_implementation(implementation)


CHECK_EVERY = 8  # decode steps between two looks at which rows have ended: one host sync each
COMPACT_FRACTION = 0.25  # ended rows leave the batch (and the cache) once they are this share of it


@torch.inference_mode()  # no autograd bookkeeping at all: 4% faster than no_grad on the tiny model
def generate(model, tokenizer, prompts, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0,
             num_samples=1):
    """Sample `num_samples` completions per prompt with the model's KV cache (`sample_next_token`).

    Each prompt is prefilled once and its cache copied to its samples; a row stops at the first of
    the model's end tokens (`end_token_ids`). temperature 0 is greedy decoding. Returns a dict with
    prompt_ids [N, P] (left padded), prompt_mask [N, P], completion_ids [N, T] (right padded),
    completion_mask [N, T] (1 up to and including the end token), logprobs [N, T] (each drawn
    token's log-probability, `sample_next_token`; 0 on padding), finished [N] (ended with an end
    token, not cut by max_new_tokens), texts (N decoded completions) and num_generated_tokens;
    N = len(prompts) * num_samples, rows of one prompt adjacent.

    Written so that a GPU does not wait on the host: the loop never reads a tensor's value except
    every CHECK_EVERY steps, when it asks how many rows have ended (one sync). An ended row keeps
    its place and writes padding until COMPACT_FRACTION of the batch has ended; then those rows
    leave the batch and the cache together. The cache is allocated whole when it fits
    (`rollout_fits`), and decoding runs through SDPA (`sdpa_attention`) with the padding mask made
    once here rather than by transformers at every step (with models whose layers all attend to
    every earlier position; with sliding-window layers transformers makes it).
    """
    device = model.device
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False).to(device)
    prompt_ids, prompt_mask = encoded["input_ids"], encoded["attention_mask"]  # [prompts, P]
    end_ids = torch.tensor(end_token_ids(model, tokenizer), device=device)
    num_rows, prompt_length = len(prompts) * num_samples, prompt_ids.shape[1]
    max_length = prompt_length + max_new_tokens
    was_training = model.training
    model.eval()  # no dropout while sampling
    cache = DynamicCache(config=model.config)  # full-attention layers preallocated, others as they are
    preallocate = rollout_fits(model, num_rows, max_length)
    cache.layers = [PreallocatedLayer(max_length, preallocate) if type(layer) is DynamicLayer
                    else layer for layer in cache.layers]
    decoder = model.get_decoder()

    def next_token_logits(input_ids, attention_mask, position_ids):  # [rows, V]: at the last position
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, use_cache=True).last_hidden_state
        return output_logits(model, hidden[:, -1])

    with sdpa_attention(model):
        positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)  # real tokens only: padding shifts nothing
        logits = next_token_logits(prompt_ids, prompt_mask, positions)
        cache.batch_repeat_interleave(num_samples)  # the samples of a prompt share its prefix
        logits = logits.repeat_interleave(num_samples, 0)  # [N, V]
        # The key positions each row attends to: its prompt's real tokens and all new positions.
        attended = torch.cat([prompt_mask.repeat_interleave(num_samples, 0),
                              prompt_mask.new_ones(num_rows, max_new_tokens)], 1)  # [N, P + T]
        if model.config._attn_implementation == "sdpa" and \
                all(isinstance(layer, PreallocatedLayer) for layer in cache.layers):
            attended = attended.bool()[:, None, None, :]  # [N, 1, 1, P + T]: SDPA's mask, as is
        next_position = positions[:, -1:].repeat_interleave(num_samples, 0) + 1  # [N, 1]
        completion_ids = torch.full((num_rows, max_new_tokens), tokenizer.pad_token_id,
                                    device=device)
        logprobs = torch.zeros(num_rows, max_new_tokens, device=device)
        row_of = torch.arange(num_rows, device=device)  # the rollout row of each batch row
        ended = torch.zeros(num_rows, dtype=torch.bool, device=device)  # [batch rows]
        for t in range(max_new_tokens):
            tokens, token_logprobs = sample_next_token(logits, temperature, top_p, top_k)
            tokens = tokens.masked_fill(ended, tokenizer.pad_token_id)  # ended rows: padding
            completion_ids[row_of, t], logprobs[row_of, t] = tokens, token_logprobs
            ended |= is_end_token(tokens, end_ids)
            if t + 1 == max_new_tokens:
                break
            if (t + 1) % CHECK_EVERY == 0:
                finite = (token_logprobs.isfinite() | ended).all()  # ended rows' draws: unused
                num_ended, finite = torch.stack([ended.sum(), finite]).tolist()
                if not finite:
                    break  # the error is raised below
                if num_ended == len(row_of):
                    break
                if num_ended >= COMPACT_FRACTION * len(row_of):  # they leave, with their cache
                    going_on = (~ended).nonzero().flatten()
                    cache.batch_select_indices(going_on)
                    row_of, tokens, ended = row_of[going_on], tokens[going_on], ended[going_on]
                    attended, next_position = attended[going_on], next_position[going_on]
            logits = next_token_logits(tokens[:, None], attended[..., :prompt_length + t + 1],
                                       next_position)
            next_position = next_position + 1
    model.train(was_training)
    # Lengths from the first end token (pad may be an end token too; ended rows wrote only pad).
    is_end = is_end_token(completion_ids[:, :t + 1], end_ids)  # [N, steps]
    finished = is_end.any(1)
    lengths = torch.where(finished, is_end.int().argmax(1) + 1, t + 1)  # [N]
    completion_ids = completion_ids[:, :int(lengths.max())]
    # The mask comes from lengths, not from token equality: pad may equal an end token.
    completion_mask = (torch.arange(completion_ids.shape[1], device=device) < lengths[:, None]).long()
    logprobs = logprobs[:, :completion_ids.shape[1]].masked_fill(completion_mask == 0, 0.0)
    if not logprobs.isfinite().all():
        raise ValueError("next-token logits hold NaN or infinity: the model's weights diverged")
    rollouts = {
        "prompt_ids": prompt_ids.repeat_interleave(num_samples, 0),
        "prompt_mask": prompt_mask.repeat_interleave(num_samples, 0),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "logprobs": logprobs,
        "finished": finished,
        "texts": [tokenizer.decode(ids[:n], skip_special_tokens=True)
                  for ids, n in zip(completion_ids.tolist(), lengths.tolist())],
        "num_generated_tokens": int(lengths.sum()),
    }
    with torch.inference_mode(False):  # callers train on these: copies that autograd accepts
        return {key: value.clone() if torch.is_tensor(value) else value
                for key, value in rollouts.items()}


def unpadded(ids, mask):
    """The rows of a padded [N, L] tensor as N lists of token ids, without their padding."""
    return [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]


# ----------------------------------------------------------------------------------------------
# The training forward pass: each prompt once, its keys and values shared by its completions


def pack(prompts, completions, pad_id, device):
    """A training batch from N rows of token-id lists, row i = prompts[i] + completions[i]: each
    distinct prompt once (the G samples of a prompt share it), left padded, and every completion
    right padded. Returns a dict of prompt_ids, prompt_mask [M, P] (M distinct prompts),
    completion_ids, completion_mask [N, T] and prompt_of_row [N] (row i continues prompt
    prompt_of_row[i]). The masks come from lengths, never from token equality, so an EOS equal to
    the pad token is still trained.
    """
    distinct = {}  # prompt -> its index, in order of first appearance
    prompt_of_row = [distinct.setdefault(tuple(prompt), len(distinct)) for prompt in prompts]

    def padded(rows, left):  # built on the CPU from Python lists, then moved in one copy
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device="cpu")
        mask = torch.zeros(len(rows), width, dtype=torch.long, device="cpu")
        for i, row in enumerate(rows):
            columns = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, columns] = torch.tensor(row, dtype=torch.long, device="cpu")
            mask[i, columns] = 1
        return ids.to(device), mask.to(device)

    prompt_ids, prompt_mask = padded(list(distinct), left=True)
    completion_ids, completion_mask = padded(completions, left=False)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "prompt_of_row": torch.tensor(prompt_of_row, device=device)}


class PromptRecorder(DynamicLayer):
    """An attention layer's cache in the prompt pass of `completion_hidden`: no earlier positions;
    it keeps the prompts' keys and values for the completion pass. (A layer that gradient
    checkpointing recomputes writes the same ones again.)"""

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys, self.values = key_states, value_states  # [M, heads, P, head_dim]
        return key_states, value_states


class SharedPromptLayer(DynamicLayer):
    """An attention layer's cache in the completion pass of `completion_hidden`: the keys and values
    of the M prompts and which prompt each of the N rows continues. update() returns each row's
    prompt followed by the row's new positions, and stores nothing, so a layer that gradient
    checkpointing recomputes sees exactly what it saw the first time. The rows' copies of their
    prompt are made inside update(), so checkpointing recomputes them instead of keeping them."""

    def __init__(self, prompt_keys, prompt_values, prompt_of_row):
        super().__init__()
        self.keys, self.values, self.prompt_of_row = prompt_keys, prompt_values, prompt_of_row
        self.is_initialized = True  # get_seq_length() is the prompt length, for the attention mask

    def update(self, key_states, value_states, *args, **kwargs):
        # index_select, not keys[rows]: its backward adds up the rows of a prompt in a fixed
        # order; that of indexing does not on several threads (runs would differ in the 7th digit)
        return (torch.cat([self.keys.index_select(0, self.prompt_of_row), key_states], -2),
                torch.cat([self.values.index_select(0, self.prompt_of_row), value_states], -2))


def completion_hidden(model, batch):
    """The final hidden states (after the last norm, before the output layer) that predict each
    completion token of `batch` (`pack`): [N, T, H], row i position t predicts completion token t.

    Two passes through the decoder. First the M distinct prompts, once each, keeping every layer's
    keys and values; then the N completions, each attending to its own prompt's keys and values and
    to itself. So the G samples of a prompt share one prompt pass: on the toy, a prompt of 184
    tokens and 8 completions of 48 are 568 positions instead of 8 x 232 = 1,856. The hidden states,
    and their gradients, which flow through the shared keys and values into the prompt pass, are
    those of one pass over each [prompt | completion] row. Position ids count real tokens only, so
    left padding shifts nothing. With gradient checkpointing, the prompts' keys and values are
    kept from one pass to the other (about one layer input's worth per prompt position and layer).

    The output layer is not applied here: at a real vocabulary its logits are the largest tensor of
    a step ([N, T, V]; with Qwen3's V = 151,936 one row of 1024 positions is 620 MB in float32), so
    the losses apply it a chunk of completion positions at a time (`chunked_output_layer`).
    """
    decoder, prompt_mask, rows = model.get_decoder(), batch["prompt_mask"], batch["prompt_of_row"]

    def run(input_ids, attention_mask, position_ids, layers):
        cache = DynamicCache(config=model.config)
        cache.layers = layers
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       cache=cache, use_cache=False).last_hidden_state  # the cache is ours, read only

    # Attention layers (plain or sliding-window) get ours; a layer that reads another layer's keys
    # and values (DummyLayer: Gemma 4's KV sharing) stays as it is (`unsupported_cache_layers`).
    prompt_layers = [PromptRecorder() if type(layer) in ATTENTION_CACHE_LAYERS else layer
                     for layer in DynamicCache(config=model.config).layers]
    prompt_hidden = run(batch["prompt_ids"], prompt_mask, (prompt_mask.cumsum(1) - 1).clamp(min=0),
                        prompt_layers)  # [M, P, H]
    completion_layers = [SharedPromptLayer(layer.keys, layer.values, rows)
                         if isinstance(layer, PromptRecorder) else layer for layer in prompt_layers]
    completion_mask = batch["completion_mask"]
    positions = prompt_mask.sum(1)[rows, None] + torch.arange(completion_mask.shape[1],
                                                              device=rows.device)  # [N, T]
    hidden = run(batch["completion_ids"], torch.cat([prompt_mask[rows], completion_mask], 1),
                 positions, completion_layers)  # [N, T, H]
    last = prompt_hidden[:, -1:].index_select(0, rows)  # [N, 1, H]: predicts completion token 0
    return torch.cat([last, hidden[:, :-1]], 1)


# ----------------------------------------------------------------------------------------------
# Log-probabilities from hidden states: the output layer a chunk of positions at a time


def output_logits(model, hidden):
    """The model's logits from its final hidden states [..., H] -> [..., V]: the output layer (tied
    to the embeddings or not), then what some models do to their final logits: Cohere multiplies
    by logit_scale, Granite divides by logits_scaling, Gemma 2 soft-caps, cap * tanh(logits / cap).
    What model(...).logits holds, up to rounding: on a CPU a plain output layer is applied as
    (b + W h^T)^T, as MKL's F.linear is 2.5x slower at the sampler's few rows (docs: Speed)."""
    config = model.config.get_text_config()
    layer = model.get_output_embeddings()
    plain = (type(layer) is torch.nn.Linear and "forward" not in vars(layer)  # not wrapped (autocast)
             and not layer._forward_hooks and not layer._forward_pre_hooks)  # no hooks to call
    if plain and hidden.device.type == "cpu":
        rows = hidden.reshape(-1, hidden.shape[-1]).T  # [H, n]
        product = layer.weight @ rows if layer.bias is None else \
            torch.addmm(layer.bias[:, None], layer.weight, rows)  # [V, n]
        logits = product.T.reshape(*hidden.shape[:-1], -1)
    else:
        logits = layer(hidden)
    scale, scaling = getattr(config, "logit_scale", None), getattr(config, "logits_scaling", None)
    logits = logits * scale if scale else logits  # Cohere
    logits = logits / scaling if scaling else logits  # Granite
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2
    return cap * torch.tanh(logits / cap) if cap else logits


class ChunkedOutputLayer(torch.autograd.Function):
    """`chunked_output_layer`'s forward and backward passes. The outputs y [n] are one number per
    row, and row i of y depends on row i of each input x only (a position's loss on its own hidden
    state), so

        dL/dx_i = dL/dy_i * dy_i/dx_i,    dy_i/dx_i = row i of d(sum_j y_j)/dx    ([n, H] in all)

    The forward pass computes y and those rows a chunk at a time, while the chunk's logits exist,
    and frees them: the backward pass is one product, with nothing recomputed. Liger-Kernel's fused
    linear cross-entropy does the same in Triton. A trainable output layer (full fine-tuning) needs
    dL/dy before its own gradient can be summed over rows, so that gradient is recomputed a chunk at
    a time in the backward pass.
    """

    @staticmethod
    def forward(context, function, chunk_size, num_tensors, *tensors_and_parameters):
        tensors, parameters = tensors_and_parameters[:num_tensors], tensors_and_parameters[num_tensors:]
        needs_grad = context.needs_input_grad[3:]  # after the 3 non-tensor arguments above
        trained = [p for p, needs in zip(parameters, needs_grad[num_tensors:]) if needs]
        outputs, monitored, jacobians = [], [], [[] for _ in tensors]
        for start in range(0, tensors[0].shape[0] or 1, chunk_size):  # n = 0: one empty chunk
            chunk = [tensor[start:start + chunk_size].detach().requires_grad_(needs)
                     for tensor, needs in zip(tensors, needs_grad)]
            differentiated = [x for x in chunk if x.requires_grad]
            with torch.enable_grad():
                output = function(*chunk)  # [c], or ([c], [c, m] monitored values)
                output, watched = output if isinstance(output, tuple) else (output, None)
                grads = iter(torch.autograd.grad(output.sum(), differentiated)
                             if differentiated else ())
            outputs.append(output.detach())  # the chunk's logits are freed here
            monitored.append(None if watched is None else watched.detach())
            for jacobian, x in zip(jacobians, chunk):
                jacobian.append(next(grads) if x.requires_grad else None)
        context.function, context.chunk_size, context.trained = function, chunk_size, trained
        context.num_tensors = num_tensors
        context.save_for_backward(*[torch.cat(rows) if rows[0] is not None else None
                                    for rows in jacobians],
                                  *(tensors if trained else ()))  # inputs: only to recompute
        if monitored[0] is None:
            return torch.cat(outputs)
        monitored = torch.cat(monitored)
        context.mark_non_differentiable(monitored)
        return torch.cat(outputs), monitored

    @staticmethod
    def backward(context, grad_output, *_):  # grad_output: dL/dy [n]; none for monitored values
        saved, num_tensors = context.saved_tensors, context.num_tensors
        jacobians, tensors = saved[:num_tensors], saved[num_tensors:]  # tensors: if it trains
        tensor_grads = [None if jacobian is None else  # dL/dy_i times row i, in float32
                        (grad_output.view(-1, *[1] * (jacobian.dim() - 1)).float()
                         * jacobian.float()).to(jacobian.dtype)
                        for jacobian in jacobians]
        parameter_grads = [torch.zeros_like(p) for p in context.trained]
        if context.trained:  # a trainable output layer: its gradient, recomputed a chunk at a time
            for start in range(0, tensors[0].shape[0], context.chunk_size):
                chunk = [tensor[start:start + context.chunk_size].detach() for tensor in tensors]
                with torch.enable_grad():
                    output = context.function(*chunk)
                    output = output[0] if isinstance(output, tuple) else output
                    grads = torch.autograd.grad(output, context.trained,
                                                grad_output[start:start + context.chunk_size])
                for total, grad in zip(parameter_grads, grads):
                    total += grad
        parameter_grads = iter(parameter_grads)
        return (None, None, None, *tensor_grads,
                *[next(parameter_grads) if needs else None
                  for needs in context.needs_input_grad[3 + num_tensors:]])


def chunked_output_layer(function, tensors, chunk_size, parameters):
    """function(*chunk) on `chunk_size` rows of the [n, ...] `tensors` at a time; the chunks' [c]
    outputs concatenated: [n]. Output i may depend on row i of the tensors only. `parameters`: every
    parameter `function` uses (the output layer's); one left out gets no gradient if it trains.
    `function` may also return a pair ([c] values, [c, m] monitored values): then the result is the
    pair ([n], [n, m]), and the monitored values, computed from the same chunk's logits for a log,
    have no gradient.

    The fused linear + loss of Liger-Kernel (its fused linear cross-entropy and JSD, there in
    Triton): `function` makes a chunk's logits from hidden states and reduces them to one number
    per position at once, so only [chunk_size, V] logits ever exist, and their gradient with respect
    to the hidden states is taken at once too (`ChunkedOutputLayer`). Peak: a few [chunk_size, V]
    float32 tensors, and one [n, H] tensor per differentiated input. Equal to the unchunked
    computation in value and gradient for rows of any shape: tests/test_fused_losses.py.
    """
    return ChunkedOutputLayer.apply(function, chunk_size, len(tensors), *tensors, *parameters)


def target_logprobs(model, hidden, targets, temperature=1.0, chunk_size=128):
    """log p(target) under softmax(logits / temperature), logits = output_logits(model, hidden):

        log p(y | h) = z_y / T - log sum_v exp(z_v / T),    z = W h    (W: the output layer)

    hidden [n, H], targets [n] -> [n] float32, computed `chunk_size` positions at a time
    (`chunked_output_layer`). RL needs the log-probs of the policy that sampled, so pass the
    sampling temperature. Equal to log_softmax of the full logits: tests/test_fused_losses.py.
    """
    def chunk_logprobs(hidden_chunk, target_chunk):
        logits = output_logits(model, hidden_chunk).float() / temperature  # [c, V]
        return -F.cross_entropy(logits, target_chunk, reduction="none")  # [c]
    return chunked_output_layer(chunk_logprobs, [hidden, targets], chunk_size,
                                list(model.get_output_embeddings().parameters()))


def token_logprobs(model, batch, temperature=1.0, chunk_size=128):
    """log p(completion token t | prompt, completion tokens before t) of each row of `batch`
    (`pack`): [N, T] float32, 0 on padding. The output layer runs on completion positions only
    (`target_logprobs`), never on the prompt.
    """
    mask = batch["completion_mask"].bool()
    logprobs = target_logprobs(model, completion_hidden(model, batch)[mask],
                               batch["completion_ids"][mask], temperature, chunk_size)
    return torch.zeros(mask.shape, device=mask.device).masked_scatter(mask, logprobs)


def compare_logits_in_chunks(function, student, student_hidden, teacher_logits, teacher_hidden,
                             chunk_size=128, extra=()):
    """function(student logits, teacher logits, *extra rows) at each of n positions: [n].
    student_hidden, teacher_hidden: [n, H] final hidden states of the student and the teacher, row
    i of both at the same completion token; teacher_logits(hidden) gives the teacher's logits,
    without gradient (OPSD's `Teacher.logits`: the teacher's output layer under its own weights);
    `extra`: more [n, ...] tensors whose rows go with them (the completion token ids, say).
    `function` maps two [c, V] logits to [c], or to [c] and [c, m] monitored values
    (`chunked_output_layer`). The logits exist `chunk_size` positions at a time; the gradient
    flows into the student only. Equal to the same function of the full logits:
    tests/test_fused_losses.py.
    """
    def chunk_values(student_chunk, teacher_chunk, *extra_chunks):  # [c, H] each -> [c]
        teacher_chunk_logits = teacher_logits(teacher_chunk)  # first: a weight swap ends before
        return function(output_logits(student, student_chunk), teacher_chunk_logits, *extra_chunks)
    return chunked_output_layer(chunk_values, [student_hidden, teacher_hidden.detach(), *extra],
                                chunk_size, list(student.get_output_embeddings().parameters()))
