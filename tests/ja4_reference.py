#!/usr/bin/env python3
"""JA4 of a TLS ClientHello, written from FoxIO's JA4 specification
(technical_details/JA4.md, the BSD-3 part) independently of flashgate's
Rust implementation, to check it (tests/tests/bot_rules.rs).

Usage: ja4_reference.py HEX   (the bytes a client sent first, in hex:
one or more TLS records holding the ClientHello). Prints the JA4.
Checks itself against the specification's worked example with --self-test.
"""

import hashlib
import struct
import sys


def grease(v):
    return (v & 0x0F0F) == 0x0A0A and (v >> 8) == (v & 0xFF)


def client_hello(data):
    """The ClientHello message body from the records at the front."""
    hs = b""
    pos = 0
    while True:
        ctype, _ver, length = struct.unpack(">BHH", data[pos:pos + 5])
        if ctype != 22:
            raise ValueError("not a handshake record")
        hs += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if len(hs) >= 4:
            if hs[0] != 1:
                raise ValueError("not a ClientHello")
            need = 4 + int.from_bytes(hs[1:4], "big")
            if len(hs) >= need:
                return hs[4:need]


def trunc_hash(text):
    if not text:
        return "000000000000"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def ja4(body):
    p = 0
    legacy = struct.unpack(">H", body[p:p + 2])[0]
    p += 2 + 32
    p += 1 + body[p]  # session id
    n = struct.unpack(">H", body[p:p + 2])[0]
    ciphers = [c for (c,) in struct.iter_unpack(">H", body[p + 2:p + 2 + n]) if not grease(c)]
    p += 2 + n
    p += 1 + body[p]  # compression methods
    exts, sigalgs, versions, alpn, sni = [], [], [], None, False
    if p < len(body):
        total = struct.unpack(">H", body[p:p + 2])[0]
        p += 2
        end = p + total
        while p < end:
            etype, elen = struct.unpack(">HH", body[p:p + 4])
            data = body[p + 4:p + 4 + elen]
            p += 4 + elen
            if grease(etype):
                continue
            exts.append(etype)
            if etype == 0x0000:
                sni = True
            elif etype == 0x0010:
                first_len = data[2]
                alpn = data[3:3 + first_len]
            elif etype == 0x000D:
                ln = struct.unpack(">H", data[:2])[0]
                sigalgs = [s for (s,) in struct.iter_unpack(">H", data[2:2 + ln])]
            elif etype == 0x002B:
                ln = data[0]
                versions = [v for (v,) in struct.iter_unpack(">H", data[1:1 + ln]) if not grease(v)]
    version = max(versions) if versions else legacy
    vtext = {0x0304: "13", 0x0303: "12", 0x0302: "11", 0x0301: "10",
             0x0300: "s3", 0x0200: "s2", 0x0100: "s1"}.get(version, "00")
    if not alpn:
        alpn_text = "00"
    elif chr(alpn[0]).isalnum() and chr(alpn[-1]).isalnum() and alpn[0] < 128 and alpn[-1] < 128:
        alpn_text = chr(alpn[0]) + chr(alpn[-1])
    else:
        h = alpn.hex()
        alpn_text = h[0] + h[-1]
    a = "t%s%s%02d%02d%s" % (vtext, "d" if sni else "i", min(len(ciphers), 99),
                             min(len(exts), 99), alpn_text)
    b = trunc_hash(",".join("%04x" % c for c in sorted(ciphers)))
    ext_text = ",".join("%04x" % e for e in sorted(exts) if e not in (0x0000, 0x0010))
    if sigalgs:
        ext_text += "_" + ",".join("%04x" % s for s in sigalgs)
    c = trunc_hash(ext_text)
    return "%s_%s_%s" % (a, b, c)


def self_test():
    assert trunc_hash("002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,cca9") == "8daaf6152771"
    assert trunc_hash("0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01_"
                      "0403,0804,0401,0503,0805,0501,0806,0601") == "e5627efa2ab1"
    print("ok")


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        self_test()
    else:
        print(ja4(client_hello(bytes.fromhex(sys.argv[1].strip()))))
