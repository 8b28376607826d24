"""The tokenizer cache: a hit for the same texts and size, a miss otherwise."""


from moekit.data import train_tokenizer


def test_tokenizer_cache_hit_and_miss(tmp_path):
    texts = ["the cat sat on the mat " * 20, "le chat est sur le tapis " * 20]
    tok, hit = train_tokenizer(texts, 300, cache_dir=tmp_path)
    assert not hit and tok.get_vocab_size() <= 300
    again, hit = train_tokenizer(texts, 300, cache_dir=tmp_path)
    assert hit and again.to_str() == tok.to_str()
    _, hit = train_tokenizer(texts + ["new text"], 300, cache_dir=tmp_path)
    assert not hit
    _, hit = train_tokenizer(texts, 280, cache_dir=tmp_path)
    assert not hit
    assert tok.decode(tok.encode("the cat").ids) == "the cat"
