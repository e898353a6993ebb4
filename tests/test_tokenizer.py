"""tokenizer.model (SentencePiece BPE) rebuilt as a `tokenizers` BPE gives SentencePiece's own ids."""
import pytest

import formats

CORPUS = ("The quick brown fox jumps over the lazy dog. " * 3 + "Fine-tuning language models is fun; "
          "tokenizers split text into pieces. Numbers like 12345 and 3.14 appear too.\n") * 40


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text(CORPUS)
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)  # as Llama 2
    return d


@pytest.mark.parametrize("text", ["The lazy fox", "  two  spaces", "unseen: Zürich ✨ 東京",
                                  "12345 tokens\nnew line"])
def test_sentencepiece_rebuild_matches_sentencepiece(spm_dir, text):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "tokenizer.model"))
    tok = formats.load_tokenizer(str(spm_dir))  # a directory with only tokenizer.model: bos added, as Llama 2 does
    assert tok.encode(text) == [sp.bos_id()] + sp.encode(text)
    assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))
