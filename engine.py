"""engine.py: what exists only for speed and memory. A reader of a method may trust it and skip it.

Each function equals a plain computation, and a test shows it (notes: docs/engine.md):
- `generate` (a KV cache written in place, each prompt prefilled once for all its samples) equals
  `model.generate` with the same sampling rule, greedy token for token (tests/test_generation.py);
- `completion_hidden` (each prompt once for all its completions) equals one forward pass per
  [prompt | completion] row in value and gradient, checkpointed or not (tests/test_generation.py);
- `chunked_output_layer` (the output layer a chunk of positions at a time, its gradient taken in
  the forward pass) and `target_logprobs`, `token_logprobs`, `compare_logits_in_chunks` equal the
  same losses on the full logits, in value and gradient (tests/test_fused_losses.py).
Every dependency on transformers internals (cache classes, decoder, output layer) lives here. This
file imports no file of the project, reads no command-line arguments and prints nothing."""
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers.cache_utils import (DummyLayer, DynamicCache, DynamicLayer,
                                      DynamicSlidingWindowLayer)

ATTENTION_CACHE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)  # replaced by our own layers


def unsupported_cache_layers(model):
    """Names of the model's KV-cache layer types the sampler and training pass cannot handle."""
    names = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    return sorted(names - {kind.__name__ for kind in (*ATTENTION_CACHE_LAYERS, DummyLayer)})


def keep_cache_in_recomputed_layers(model):
    """Let layers that gradient checkpointing recomputes use a cache (transformers turns it off)."""
    from transformers.modeling_layers import GradientCheckpointingLayer  # slow: only when needed
    for layer in model.modules():
        if isinstance(layer, GradientCheckpointingLayer):
            layer._can_checkpoint_with_cache = True  # safe here: docs/engine.md


# ---- The sampler ---------------------------------------------------------------------------------


def end_token_ids(model, tokenizer):
    """The token ids that end a completion: the tokenizer's EOS and the generation config's."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    return sorted({tokenizer.eos_token_id, *configured} - {None})


def is_end_token(tokens, end_ids):
    """Whether each token is one of end_ids: a bool tensor of tokens' shape (docs/engine.md)."""
    return (tokens[..., None] == end_ids).any(-1)  # not torch.isin: it may sync


def sample_next_token(logits, temperature=0.0, top_p=1.0, top_k=0):
    """One token per row of next-token logits [N, V], and its log-probability: tokens [N], logprobs
    [N] float32. temperature 0: the argmax; else softmax(logits / temperature) restricted to the
    top_k (0: all), then top_p (1: all) most likely tokens, renormalised, as transformers does.
    logprobs: log softmax(logits / temperature) at the token, before top_k and top_p, temperature 1
    if greedy: what `target_logprobs` computes (docs/engine.md)."""
    if temperature == 0:
        tokens = logits.argmax(-1)
    else:
        tokens = inverse_cdf_draw(restrict(logits.float() / temperature, top_p, top_k))
    return tokens, logprobs_of(logits, tokens, temperature or 1.0)


def logprobs_of(logits, targets, temperature=1.0):
    """log softmax(logits / temperature) at each row's target: [n, V], [n] -> [n] float32."""
    scaled = logits.float() / temperature if temperature != 1 else logits.float()
    return scaled.gather(-1, targets[:, None]).squeeze(-1) - scaled.logsumexp(-1)


def entropy_of(logits, temperature=1.0):
    """-sum_v p_v log p_v of p = softmax(logits / temperature): [..., V] -> [...] float32, without
    gradient (a health metric: it falls as a policy collapses)."""
    with torch.no_grad():
        log_p = F.log_softmax(logits.float() / temperature, dim=-1)
        return -(log_p.exp() * log_p).sum(-1)


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
        logits = logits.masked_fill(tail.scatter(1, order, tail), float("-inf"))  # in vocab order
    return logits


def inverse_cdf_draw(logits):
    """One token per row of softmax(logits) [N, V], drawn by the inverse CDF (docs/engine.md)."""
    cumulative = logits.softmax(-1, dtype=torch.float64).cumsum(-1)  # [N, V]
    total = cumulative[:, -1:]  # [N, 1], 1 up to rounding
    u = torch.minimum(torch.rand(total.shape, dtype=torch.float64, device=total.device) * total,
                      total.nextafter(torch.zeros_like(total)))  # uniform below the total
    return torch.searchsorted(cumulative, u, right=True).squeeze(1).clamp_(max=logits.shape[1] - 1)


class PreallocatedLayer(DynamicLayer):
    """One attention layer's KV cache in [rows, heads, capacity, head_dim] buffers written in place:
    max_length positions from the first decode step with `preallocate`, else doubling when full;
    keys / values: views of the first `length` positions. Made for `generate` (docs/engine.md)."""

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
    """Whether a KV cache of `rows` x `length` positions in every layer may be allocated whole: on
    CUDA if it takes at most half the free memory; elsewhere always (docs/engine.md)."""
    device = model.device
    if device.type != "cuda":
        return True
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    cache_bytes = 2 * config.num_hidden_layers * rows * length * heads * head_dim \
        * model.dtype.itemsize  # weights' dtype: safe under autocast (docs)
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) \
        - torch.cuda.memory_allocated(device)  # blocks the allocator holds are free to us
    return cache_bytes <= free / 2


@contextmanager
def sdpa_attention(model):
    """The model with PyTorch's scaled_dot_product_attention while decoding, its own implementation
    back afterwards: Flash Attention 2 syncs with the host at every layer (docs/engine.md)."""
    implementation = model.config._attn_implementation
    if implementation.startswith("flash_attention") and getattr(model, "_supports_sdpa", False):
        model.set_attn_implementation("sdpa")  # not Gemma 2: no SDPA path, for its soft cap
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
    """`num_samples` completions per prompt with a KV cache (`sample_next_token`; temperature 0:
    greedy), each prompt prefilled once, a row ending at its first end token (`end_token_ids`).
    Returns N = len(prompts) * num_samples rows, a prompt's adjacent, as `pack` takes them: prompts,
    completions (N lists of ids, up to and including the end token), logprobs (N [length] tensors),
    finished (N bools: ended by an end token, not by max_new_tokens), texts (N decoded completions)
    and num_generated_tokens. No host sync but every CHECK_EVERY steps (docs/engine.md)."""
    device = model.device
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                        add_special_tokens=False).to(device)
    prompt_ids, prompt_mask = encoded["input_ids"], encoded["attention_mask"]  # [prompts, P]
    end_ids = torch.tensor(end_token_ids(model, tokenizer), device=device)
    num_rows, prompt_length = len(prompts) * num_samples, prompt_ids.shape[1]
    max_length = prompt_length + max_new_tokens
    was_training = model.training
    model.eval()  # no dropout while sampling
    cache = DynamicCache(config=model.config)  # full-attention layers preallocated, others kept
    preallocate = rollout_fits(model, num_rows, max_length)
    cache.layers = [PreallocatedLayer(max_length, preallocate) if type(layer) is DynamicLayer
                    else layer for layer in cache.layers]
    decoder = model.get_decoder()

    def next_token_logits(input_ids, attention_mask, position_ids):  # [rows, V], last position
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, use_cache=True).last_hidden_state
        return output_logits(model, hidden[:, -1])

    with sdpa_attention(model):
        positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)  # real tokens only, not padding
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
                if not finite or num_ended == len(row_of):
                    break  # not finite: the error is raised below
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
    after_end = torch.arange(t + 1, device=device) >= lengths[:, None]  # [N, steps]: unused draws
    if not (logprobs[:, :t + 1].isfinite() | after_end).all():
        raise ValueError("next-token logits hold NaN or infinity: the model's weights diverged")
    prompt_lengths, lengths = prompt_mask.sum(1).tolist(), lengths.tolist()
    prompt_rows = [ids[len(ids) - n:] for ids, n in zip(prompt_ids.tolist(), prompt_lengths)]
    completions = [ids[:n] for ids, n in zip(completion_ids[:, :t + 1].tolist(), lengths)]
    with torch.inference_mode(False):  # callers compute with these: a copy that autograd accepts
        logprobs = logprobs.clone()
    return {"prompts": [prompt_rows[i // num_samples] for i in range(num_rows)],
            "completions": completions,
            "logprobs": [row[:n] for row, n in zip(logprobs, lengths)],
            "finished": finished.tolist(),
            "texts": [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions],
            "num_generated_tokens": sum(lengths)}


# ---- The training forward pass: each prompt once, its keys and values shared by its completions --


def pack(prompts, completions, pad_id, device):
    """A batch from N rows, row i = prompts[i] + completions[i] (token-id lists): prompt_ids,
    prompt_mask [M, P] (each distinct prompt once, left padded), completion_ids, completion_mask
    [N, T] (right padded; masks from lengths: docs/engine.md), prompt_of_row [N]: row i's prompt."""
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
    """An attention layer's cache in `completion_hidden`'s prompt pass: no earlier positions; it
    keeps the prompts' keys and values for the completion pass (a recompute writes the same)."""

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys, self.values = key_states, value_states  # [M, heads, P, head_dim]
        return key_states, value_states


class SharedPromptLayer(DynamicLayer):
    """An attention layer's cache in `completion_hidden`'s completion pass: update() returns each
    row's prompt, then the row's new positions, and stores nothing (docs/engine.md)."""

    def __init__(self, prompt_keys, prompt_values, prompt_of_row):
        super().__init__()
        self.keys, self.values, self.prompt_of_row = prompt_keys, prompt_values, prompt_of_row
        self.is_initialized = True  # get_seq_length() is the prompt length, for the attention mask

    def update(self, key_states, value_states, *args, **kwargs):
        # index_select, not keys[rows]: its backward sums a prompt's rows in a fixed order
        return (torch.cat([self.keys.index_select(0, self.prompt_of_row), key_states], -2),
                torch.cat([self.values.index_select(0, self.prompt_of_row), value_states], -2))


def completion_hidden(model, batch):
    """The final hidden states (after the last norm) that predict the completion tokens of `batch`
    (`pack`): [N, T, H], position t predicting token t. The M prompts run once each, then the N
    completions attend to their prompt's keys and values. No output layer (docs/engine.md)."""
    decoder, prompt_mask, rows = model.get_decoder(), batch["prompt_mask"], batch["prompt_of_row"]

    def run(input_ids, attention_mask, position_ids, layers):
        cache = DynamicCache(config=model.config)
        cache.layers = layers
        return decoder(input_ids=input_ids, attention_mask=attention_mask,  # cache: ours, read only
                       position_ids=position_ids, cache=cache, use_cache=False).last_hidden_state

    prompt_layers = [PromptRecorder() if type(layer) in ATTENTION_CACHE_LAYERS else layer
                     for layer in DynamicCache(config=model.config).layers]  # DummyLayer: kept
    prompt_hidden = run(batch["prompt_ids"], prompt_mask, (prompt_mask.cumsum(1) - 1).clamp(min=0),
                        prompt_layers)  # [M, P, H]; positions count real tokens, not padding
    completion_layers = [SharedPromptLayer(layer.keys, layer.values, rows)
                         if isinstance(layer, PromptRecorder) else layer for layer in prompt_layers]
    completion_mask = batch["completion_mask"]
    positions = prompt_mask.sum(1)[rows, None] + torch.arange(completion_mask.shape[1],
                                                              device=rows.device)  # [N, T]
    hidden = run(batch["completion_ids"], torch.cat([prompt_mask[rows], completion_mask], 1),
                 positions, completion_layers)  # [N, T, H]
    last = prompt_hidden[:, -1:].index_select(0, rows)  # [N, 1, H]: predicts completion token 0
    return torch.cat([last, hidden[:, :-1]], 1)


# ---- Log-probabilities from hidden states, the output layer a chunk of positions at a time -------


def output_logits(model, hidden):
    """The model's logits [..., V] from its final hidden states [..., H]: model(...).logits up to
    rounding (the output layer, then the model's own scaling or soft cap; docs/engine.md)."""
    config = model.config.get_text_config()
    layer = model.get_output_embeddings()
    plain = (type(layer) is torch.nn.Linear and "forward" not in vars(layer)  # no autocast wrapper
             and not layer._forward_hooks and not layer._forward_pre_hooks)  # no hooks to call
    if plain and hidden.device.type == "cpu":  # (b + W h^T)^T: MKL's F.linear is slower
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
    """`chunked_output_layer`'s passes: dL/dx_i = dL/dy_i * (row i of d(sum_j y_j)/dx), those rows
    computed in the forward pass while a chunk's logits exist (docs/engine.md)."""

    @staticmethod
    def forward(context, function, chunk_size, num_tensors, *inputs):  # tensors, then parameters
        tensors, parameters = inputs[:num_tensors], inputs[num_tensors:]
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
        if context.trained:  # a trainable output layer needs dL/dy: recomputed a chunk at a time
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
    """function(*chunk) on `chunk_size` rows of the [n, ...] `tensors` at a time, its [c] outputs
    concatenated: [n], output i of row i only; for ([c], [c, m] monitored values): ([n], [n, m]),
    the latter without gradient. `parameters`: all that `function` uses (docs/engine.md)."""
    return ChunkedOutputLayer.apply(function, chunk_size, len(tensors), *tensors, *parameters)


def target_logprobs(model, hidden, targets, temperature=1.0, chunk_size=128, entropy=False):
    """log softmax(output_logits(model, hidden) / temperature) at the targets: hidden [n, H],
    targets [n] -> [n] float32, `chunk_size` positions at a time (RL: the sampling temperature).
    entropy=True: also each position's `entropy_of` [n], from the same chunk's logits."""
    def chunk_logprobs(hidden_chunk, target_chunk):
        logits = output_logits(model, hidden_chunk).float() / temperature  # [c, V]
        logprobs = -F.cross_entropy(logits, target_chunk, reduction="none")  # [c]
        return (logprobs, entropy_of(logits)[:, None]) if entropy else logprobs  # [c], [c, 1]
    values = chunked_output_layer(chunk_logprobs, [hidden, targets], chunk_size,
                                  list(model.get_output_embeddings().parameters()))
    return (values[0], values[1][:, 0]) if entropy else values


def token_logprobs(model, batch, temperature=1.0, chunk_size=128, entropy=False):
    """log p(completion token t | prompt, tokens before t) of each row of `batch` (`pack`): [N, T]
    float32, 0 on padding; the output layer runs on completion positions only. entropy=True:
    (that, the entropies [N, T]) (`target_logprobs`)."""
    mask = batch["completion_mask"].bool()
    values = target_logprobs(model, completion_hidden(model, batch)[mask],
                             batch["completion_ids"][mask], temperature, chunk_size, entropy)
    unpacked = [torch.zeros(mask.shape, device=mask.device).masked_scatter(mask, value)
                for value in (values if entropy else [values])]
    return tuple(unpacked) if entropy else unpacked[0]


def compare_logits_in_chunks(function, student, student_hidden, teacher_logits, teacher_hidden,
                             chunk_size=128, extra=()):
    """function(student logits, teacher logits, *extra rows) at n positions, from [n, H] final
    hidden states of both -> [n], the gradient into the student only; teacher_logits(hidden) gives
    the teacher's; `extra`: more [n, ...] rows (docs/engine.md)."""
    def chunk_values(student_chunk, teacher_chunk, *extra_chunks):  # [c, H] each -> [c]
        teacher_chunk_logits = teacher_logits(teacher_chunk)  # first: a weight swap ends before
        return function(output_logits(student, student_chunk), teacher_chunk_logits, *extra_chunks)
    return chunked_output_layer(chunk_values, [student_hidden, teacher_hidden.detach(), *extra],
                                chunk_size, list(student.get_output_embeddings().parameters()))
