"""A tiny stand-in for all-mpnet-base-v2, built offline in a second: a lowercase WordPiece tokenizer trained
on bundled text and a 2-layer MPNet saved *without* its masked-LM head (as the real one ships)."""

from __future__ import annotations

from pathlib import Path


def wordpiece_tokenizer(texts: list[str], vocab_size: int = 800):
    """A lowercase WordPiece tokenizer with MPNet's special tokens (<s> text </s>)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special,
                                                             show_progress=False))
    tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                   sep_token="</s>", unk_token="[UNK]", pad_token="<pad>", mask_token="<mask>")


def save_headless_mpnet(path: Path, texts: list[str], hidden: int = 32, layers: int = 2) -> Path:
    """An MPNet encoder without its LM head, with its tokenizer, in ``path`` (save_pretrained layout)."""
    import torch
    from transformers import MPNetConfig, MPNetModel

    tokenizer = wordpiece_tokenizer(texts)
    config = MPNetConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=hidden * 2, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    MPNetModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
