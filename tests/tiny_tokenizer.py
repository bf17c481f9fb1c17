"""A real (``tokenizers``-backed) character tokenizer over the tiny models' vocabulary, for
generation tests: one character per id, ids 0/1/2 are <pad>/<bos>/<eos>."""

from oracle import TOK, VOCAB

from llmarch.checkpoints.tokenizer import Tokenizer

SPECIAL = ["<pad>", "<bos>", "<eos>"]
CHARS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [" ", ".", ","] + [
    chr(0x3B1 + i) for i in range(VOCAB - len(SPECIAL) - 29)  # Greek and beyond: multi-byte UTF-8
]


def tiny_tokenizer() -> Tokenizer:
    from tokenizers import Regex, decoders, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    assert len(vocab) == VOCAB and vocab["<eos>"] == TOK["eos_token_id"]
    backend = Backend(WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL)
    return Tokenizer(backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", add_bos_token=True)
