"""Write a model folder with a randomly initialised Qwen3 of a given shape, for benchmarks.

    python toy/random_model.py standin models/standin          # V = 151,936, 2 layers: 0.75 GB
    python toy/random_model.py tiny models/tiny                # toy vocabulary, for speed tests
    python toy/random_model.py qwen3-1.7b models/qwen3-1.7b    # Qwen3-1.7B's exact shape, bf16: 3.4 GB

Memory and speed at a real scale can be measured without real weights: what a training step costs
depends on the shapes (vocabulary, width, depth, sequence lengths), not on what the weights know.
The folder is an ordinary Hugging Face model folder (config.json, model.safetensors,
generation_config.json, tokenizer files, chat_template.jinja), so sft.py, grpo.py and opsd.py load
it with --model FOLDER and run it on --data toy like any other model.

- Tokenizer. With the toy's vocabulary (97 entries) it is the toy's own (toy/model). With a larger
  vocabulary it is a word-level tokenizer of exactly vocab_size entries: the toy's special tokens and
  characters first, with the toy's ids (a toy problem is tokenized exactly as the toy model sees it),
  then "<unk>" and filler tokens "<filler123>" up to vocab_size. Same chat template, EOS and pad.
- Completions run to --max-new-tokens, which benchmarks want (every step then costs the same). A
  random model would otherwise sample an end token now and then: its logits are nearly uniform, so
  at the toy's vocabulary of 97, with 2 end tokens, a 48-token completion would stop early 6 times
  in 10. So the special tokens' rows of the output layer are near zero (their logit is about 0) and the
  final norm is scaled so that the other logits have a standard deviation of LOGIT_STD = 8: the
  largest is then ~20 above 0 (~35 at Qwen3's vocabulary) and an end token's probability < 1e-8. The completions are
  gibberish, and at the toy's vocabulary close to deterministic, often one character repeated (the
  hidden states of a random transformer are much alike at all positions): a prompt's samples tend
  to agree. They cost what any completion of their length costs, which is what is measured.
- Seeded: the same shape gives the same weights every time. Run again, it sees the finished folder
  and returns at once; it writes into a temporary folder beside the target and renames it at the
  end, so a crash never leaves a half-written model folder.
"""
import argparse
import math
import tempfile
from pathlib import Path

TOY_MODEL = Path(__file__).resolve().parent / "model"
TOY_VOCAB_SIZE = 97  # the toy's <|endoftext|>, <|im_start|>, <|im_end|> and 94 characters
LOGIT_STD = 8.0  # spread of the random output logits (see the docstring)
SEED = 1234

# Qwen3 shapes. "standin" is the real-vocabulary memory stand-in of ../shared/real-models.md:
# Qwen3's vocabulary and Qwen3-0.6B's layer shape (hidden 1024, MLP 3072, 16 query heads and 8
# key/value heads of 128), but 2 layers instead of 28, so the [rows, positions, 151,936] logits
# dominate a step's memory as they do at real scale. "qwen3-1.7b" is Qwen3-1.7B's config.json
# (saved in bfloat16 like the real checkpoint). "tiny" is the toy model's shape (0.8M parameters),
# where the per-token overhead of sampling and training shows more than the arithmetic (at hidden
# 256, 3.5M parameters, a GRPO step of 8 x 8 x 48 tokens takes 2.5x as long on 2 CPU cores).
SHAPES = {
    "tiny": dict(vocab_size=TOY_VOCAB_SIZE, hidden_size=128, num_hidden_layers=4,
                 intermediate_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 tie_word_embeddings=True),
    "standin": dict(vocab_size=151_936, hidden_size=1024, num_hidden_layers=2,
                    intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                    head_dim=128, tie_word_embeddings=True, rope_theta=1_000_000.0,
                    max_position_embeddings=40_960),
    "qwen3-1.7b": dict(vocab_size=151_936, hidden_size=2048, num_hidden_layers=28,
                       intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, tie_word_embeddings=True, rope_theta=1_000_000.0,
                       max_position_embeddings=40_960, dtype="bfloat16"),
}
# What a finished folder holds; write() writes all of them, so any one missing means "not built".
FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
         "tokenizer_config.json", "chat_template.jinja")


def is_built(folder):
    return all((Path(folder) / name).is_file() for name in FILES)


def make_tokenizer(vocab_size):
    """The toy's tokenizer at the toy's vocabulary size, else a word-level tokenizer of exactly
    vocab_size entries that tokenizes toy text as the toy does (same ids)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    toy = AutoTokenizer.from_pretrained(TOY_MODEL)
    if vocab_size == len(toy):
        return toy
    if vocab_size < len(toy) + 1:
        raise ValueError(f"vocab_size {vocab_size}: the toy's {len(toy)} tokens and <unk> need more")
    vocab = dict(sorted(toy.get_vocab().items(), key=lambda item: item[1]))  # ids 0..96 as the toy's
    vocab["<unk>"] = len(vocab)  # a character the toy does not know (word-level needs an unknown)
    while len(vocab) < vocab_size:
        vocab[f"<filler{len(vocab)}>"] = len(vocab)  # never in a prompt; a random model samples them
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Every character is a "word" of its own, as the toy tokenizes (one token per character).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # decoding concatenates the tokens, no spaces in between
    specials = [token for token in vocab if token.startswith("<|")]  # the toy's special tokens
    backend.add_special_tokens(specials)  # matched whole, before the per-character split
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=toy.eos_token,
                                        pad_token=toy.pad_token, unk_token="<unk>")
    tokenizer.chat_template = toy.chat_template
    assert len(tokenizer) == vocab_size
    return tokenizer


def make_model(shape, tokenizer, seed=SEED):
    """A randomly initialised Qwen3ForCausalLM of `shape` (a dict like SHAPES' values)."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    shape = dict(shape)
    dtype = getattr(torch, shape.pop("dtype", "float32"))
    rope_theta = shape.pop("rope_theta", 10_000.0)
    config = Qwen3Config(**shape, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                         rms_norm_eps=1e-6, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)  # initialised in float32 from the seed, whatever dtype is saved
    with torch.no_grad():
        # End tokens never sampled (see the docstring): logit ~0 for the special tokens, and the
        # rest spread wide. RMSNorm makes every entry of the final hidden state h have RMS equal to
        # the norm's weight w, so a logit h . e_v with e_v ~ N(0, std^2) has standard deviation
        # w * std * sqrt(hidden_size).
        special = [i for token, i in tokenizer.get_vocab().items() if token.startswith("<|")]
        # Scaled down, not zeroed: with tied embeddings these are also the input embeddings, and
        # a zero input stays exactly zero through every layer, where each RMSNorm's backward
        # multiplies its gradient by 1/sqrt(eps) = 1000: inf after 28 layers (seen on a GPU).
        model.lm_head.weight[special] *= 1e-3
        model.model.norm.weight.fill_(LOGIT_STD / (config.initializer_range
                                                   * math.sqrt(config.hidden_size)))
    # Qwen3 ends a completion at <|im_end|> or <|endoftext|>; engine.generate stops at both.
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        pad_token_id=tokenizer.pad_token_id)
    return model.to(dtype)


def write(shape_name, folder, seed=SEED):
    """Write the model folder of SHAPES[shape_name] unless it is already complete; return its path."""
    folder = Path(folder).resolve()
    if is_built(folder):
        return folder
    from transformers.utils.logging import disable_progress_bar
    shape = SHAPES[shape_name]
    tokenizer = make_tokenizer(shape["vocab_size"])
    model = make_model(shape, tokenizer, seed)
    disable_progress_bar()  # no "Writing model shards" bar
    folder.parent.mkdir(parents=True, exist_ok=True)
    # The staging folder sits beside the target, on the same file system, so the rename is atomic.
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as staging:
        out = Path(staging) / "model"
        model.save_pretrained(out)  # safetensors; a tied output layer is stored once
        tokenizer.save_pretrained(out)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
        out.rename(folder)  # fails, and keeps nothing of this run, if a non-empty folder is there
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES), help="which configuration")
    parser.add_argument("folder", help="where to write the model folder")
    parser.add_argument("--seed", type=int, default=SEED,
                        help="of the random weights (default: %(default)s)")
    args = parser.parse_args()
    print(write(args.shape, args.folder, args.seed))


if __name__ == "__main__":
    main()
