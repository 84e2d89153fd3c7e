"""Write a small randomly initialised Chinese GPT-2 or BERT (save_pretrained folder) for runs without pretrained weights.

python studies/random_base/random_base.py --family gpt2 --vocab ../shared/models/vocab-zh-21128.txt --out /tmp/gpt2-random
The tokenizer is BERT-style, one token per Chinese character, as for uer/gpt2-chinese-cluecorpussmall and bert-base-chinese.
"""
import argparse

import torch
from transformers import BertConfig, BertForMaskedLM, BertTokenizer, GPT2Config, GPT2LMHeadModel


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("gpt2", "bert"), required=True)
    parser.add_argument("--vocab", required=True, help="vocab.txt, one token per line")
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    tokenizer = BertTokenizer(args.vocab, do_lower_case=False)
    if args.family == "gpt2":
        config = GPT2Config(
            vocab_size=len(tokenizer), n_positions=512, n_embd=args.hidden, n_layer=args.layers, n_head=args.heads,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
            tokenizer_class="BertTokenizer",
        )
        model = GPT2LMHeadModel(config)
    else:
        config = BertConfig(
            vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
            intermediate_size=4 * args.hidden, pad_token_id=tokenizer.pad_token_id,
        )
        model = BertForMaskedLM(config)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"{args.family}: {sum(p.numel() for p in model.parameters()):,} parameters, random init, saved to {args.out}")


if __name__ == "__main__":
    main()
