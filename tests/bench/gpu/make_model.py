"""Random-weight models of the Qwen3 0.6B / 4B shapes, for speed work on the GPU machine.

The machine has no network, so the tokenizer is SmolLM2's (ChatML, like Qwen's), carried
over; the vocabulary is therefore 49,152 instead of Qwen3's 151,936 (a smaller LM head),
everything else is the real shape.

    python tests/bench/gpu/make_model.py qwen3-4b /tmp/models/qwen3-4b --tokenizer DIR [--vocab 151936]

`--vocab` pads the vocabulary to a size of one's own (Qwen3's is 151,936), for work whose
cost grows with it (the LM head, penalties); the tokenizer still uses only its own ids, so
read such a model's outputs as token ids, not text.
"""
import argparse
import shutil
from pathlib import Path

SHAPES = {
    "qwen3-0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "qwen3-4b": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("shape", choices=SHAPES)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--vocab", type=int, help="vocabulary size (default: the tokenizer's)")
    args = parser.parse_args()
    if (args.dest / "config.json").exists():
        return
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = Qwen3Config(vocab_size=args.vocab or len(tokenizer), max_position_embeddings=40960, rope_theta=1000000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         torch_dtype="bfloat16", **SHAPES[args.shape])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(args.dest)
    tokenizer.save_pretrained(args.dest)
    print(f"made {args.shape} at {args.dest}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")
    shutil.copy(args.tokenizer / "chat_template.jinja", args.dest / "chat_template.jinja") \
        if (args.tokenizer / "chat_template.jinja").exists() else None


if __name__ == "__main__":
    main()
