"""PNG decoding on the gateway's hot path: libspng for plain RGB PNGs, Pillow for the rest, the same pixels."""

from __future__ import annotations

import base64
import io
import zlib

import numpy as np
import pytest
from PIL import Image

from adaptive_quant.serving import decode
from adaptive_quant.serving.decode import decode_instances
from adaptive_quant.serving.errors import InputError


def _png(arr: np.ndarray, mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(arr)
    (im.convert(mode) if mode else im).save(buf, format="PNG", **save)
    return buf.getvalue()


def _decode(raw: bytes) -> np.ndarray:
    return decode_instances({"instances": [{"b64": base64.b64encode(raw).decode()}]}, 4, 32)[0]


def _pillow(raw: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


IMG = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_a_plain_rgb_png_takes_libspng_and_gives_pillows_pixels(monkeypatch):
    raw = _png(IMG)
    fast = decode._decode_plain_png(raw, 0, 32, "")
    assert fast is not None and np.array_equal(fast, IMG) and np.array_equal(fast, _pillow(raw))
    # and the request path uses it: with libspng broken, the same request fails loudly
    monkeypatch.setattr(decode.pyspng, "load", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("spng")))
    with pytest.raises(InputError, match="does not decode"):
        _decode(raw)


@pytest.mark.parametrize(
    "mode, save",
    [("RGBA", {}), ("L", {}), ("P", {}), ("I;16", {})],
    ids=["rgba", "grey", "palette", "16-bit grey"],
)
def test_other_pngs_go_to_pillow_and_arrive_as_rgb(mode, save):
    if mode == "I;16":
        raw = _png(IMG[:, :, 0].astype(np.uint16) * 257)
    else:
        raw = _png(IMG, mode, **save)
    assert decode._decode_plain_png(raw, 0, 32, "") is None  # not the fast path's case
    out = _decode(raw)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and np.array_equal(out, _pillow(raw))


def test_the_header_size_is_refused_before_any_pixel_is_decoded():
    big = _png(np.zeros((64, 48, 3), np.uint8))
    with pytest.raises(InputError, match="48×64 pixels, expected 32×32"):
        _decode(big)


def test_corrupt_and_truncated_pngs_are_clear_errors():
    raw = bytearray(_png(IMG))
    idat = raw.index(b"IDAT")
    raw[idat + 20] ^= 0xFF  # a flipped byte inside the compressed pixels: the chunk's CRC no longer matches
    with pytest.raises(InputError, match="instance 0: 'b64' does not decode to an image"):
        _decode(bytes(raw))
    with pytest.raises(OSError):  # as Pillow refuses it (it decoded every PNG before)
        _pillow(bytes(raw))
    with pytest.raises(InputError, match="does not decode"):
        _decode(_png(IMG)[:-40])  # cut inside the pixel data
    # a header that promises RGB but whose pixel stream is too short for 32×32
    good = _png(IMG)
    start = good.index(b"IDAT") - 4
    short = zlib.compress(b"\x00" * 10)
    chunk = len(short).to_bytes(4, "big") + b"IDAT" + short + zlib.crc32(b"IDAT" + short).to_bytes(4, "big")
    end = good.index(b"IEND") - 4
    with pytest.raises(InputError, match="does not decode"):
        _decode(good[:start] + chunk + good[end:])
