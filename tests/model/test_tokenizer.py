"""The Mistral v1 tokenizer, offline."""

from model.tokenizer import load_tokenizer


def test_mistral_v1_special_ids_and_size():
    tokenizer = load_tokenizer()
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (32000, 1, 2)


def test_unicode_round_trip():
    tokenizer = load_tokenizer()
    text = "Ay, marry — “Ophélie”! 你好, Κόσμε 🙂\n\tdouble  space"
    ids = tokenizer.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids
    assert tokenizer.decode(ids) == text


def test_known_encoding():
    assert load_tokenizer().encode("Hello world") == [22557, 1526]
