#!/usr/bin/env python3
"""An independent safetensors writer and reader for switchmoe's interoperability tests.

Standard library and numpy only (Debian 12 has no safetensors package). It follows the format
as Hugging Face specifies it: an 8-byte little-endian header length, a UTF-8 JSON header, then
each tensor's raw little-endian bytes, row-major, at its data_offsets.

    interop.py write-tensors DIR   writes DIR/python_tensors.safetensors and a manifest
                                   DIR/python_tensors.json of the float32 bits a reader must get
    interop.py check-tensors DIR   checks DIR/cpp_tensors.safetensors (written by the C++ writer)
                                   against DIR/cpp_tensors.json, bit for bit; exit status 1 on
                                   any difference
    interop.py write-switch DIR    writes DIR/hf_switch_{F32,BF16,F16}.safetensors: a small
                                   SwitchTransformers sparse MLP and a dense T5 FFN under Hugging
                                   Face names, an input, and the outputs numpy computes for them
    interop.py write-sharded DIR   writes that sparse MLP (BF16) in 3 shards with Hugging Face's
                                   DIR/model.safetensors.index.json, and the input and numpy's
                                   output in DIR/hf_sharded_io.safetensors
    interop.py check-sharded DIR   checks the shards and index in DIR/cpp_sharded/ (written by
                                   the C++ side) against DIR/cpp_sharded.json, bit for bit
    interop.py write-mixtral DIR   writes DIR/hf_mixtral_{F32,BF16}.safetensors: a small Mixtral
                                   sparse MoE block (SwiGLU experts, top-2) under Hugging Face
                                   names, an input, the output numpy computes for it and the
                                   error bound of a bfloat16 layer
    interop.py corpus DIR          writes the fuzzer's seed corpus: valid and broken files
"""

import json
import os
import struct
import sys

import numpy as np

# The reference implementation's dtype order (tensors are laid out largest first).
DTYPE_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32",
               "U32", "F32", "F64", "I64", "U64"]
DTYPE_SIZE = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I32": 4, "U8": 1, "I64": 8}


def bf16_bits(values):
    """float32 -> bfloat16 bits, round to nearest even, on the uint32 bit pattern (no NaN)."""
    bits = np.ascontiguousarray(values, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2")


def f16_bits(values):
    """float32 -> IEEE half bits; numpy's conversion rounds to nearest even."""
    with np.errstate(over="ignore"):
        return np.asarray(values, dtype="<f4").astype("<f2").view("<u2")


def widened_bits(dtype, stored):
    """The float32 bits a reader must produce from the stored element bits."""
    if dtype == "F32":
        return stored.astype("<u4")
    if dtype == "BF16":
        return stored.astype("<u4") << 16
    if dtype == "F16":
        return stored.view("<f2").astype("<f4").view("<u4")
    raise ValueError(dtype)


def encode(dtype, values):
    """(element bits as a numpy array, raw bytes) of float32 `values` stored as `dtype`."""
    values = np.ascontiguousarray(values, dtype="<f4")
    if dtype == "F32":
        stored = values.view("<u4")
    elif dtype == "BF16":
        stored = bf16_bits(values)
    elif dtype == "F16":
        stored = f16_bits(values)
    else:
        raise ValueError(dtype)
    return stored, stored.tobytes()


def build_file(tensors, metadata=None, pad=True):
    """tensors: list of (name, dtype, shape, raw bytes), laid out in the given order."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if pad:
        text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(t[3] for t in tensors)


def parse_file(blob):
    """(header dict, data bytes, header length) of a safetensors file, checked strictly."""
    if len(blob) < 8:
        raise ValueError("shorter than 8 bytes")
    (length,) = struct.unpack("<Q", blob[:8])
    if 8 + length > len(blob):
        raise ValueError("header past the end")

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise ValueError("duplicate keys")
        return dict(pairs)

    header = json.loads(blob[8:8 + length].decode("utf-8"), object_pairs_hook=no_duplicates)
    data = blob[8 + length:]
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    end = 0
    for begin, stop in spans:
        if begin != end:
            raise ValueError("offsets not contiguous")
        end = stop
    if end != len(data):
        raise ValueError("trailing bytes")
    return header, data, length


def special_values():
    """float32 values that exercise rounding: ties, carries, denormals, signed zero, infinity."""
    specials = [0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"),
                1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 1 + 2.0 ** -8 + 2.0 ** -20,   # bf16 ties
                1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 65504.0, 65519.0,           # f16 ties
                2.0 ** -126, 2.0 ** -140, 2.0 ** -149, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26,
                255.99998, 1.9999999, -1.00390625]
    return np.array(specials, dtype="<f4")


def write_tensors(folder):
    rng = np.random.default_rng(2021)
    specials = special_values()
    tensors, manifest = [], {}
    plan = [("dense.f32", "F32", (5, 7), rng.normal(0, 2, (5, 7))),
            ("dense.bf16", "BF16", (6, 3), rng.normal(0, 10, (6, 3))),
            ("dense.f16", "F16", (4, 4), rng.normal(0, 100, (4, 4))),
            ("vector.bf16", "BF16", (specials.size,), specials),
            ("vector.f16", "F16", (specials.size,), specials),
            ("vector.f32", "F32", (specials.size,), specials),
            ("empty.f32", "F32", (0, 4), np.zeros((0, 4))),
            ("scalar.f16", "F16", (), np.array(0.333333, dtype="<f4"))]
    # Not in the C++ writer's order: a reader must not depend on it.
    for name, dtype, shape, values in plan:
        stored, raw = encode(dtype, np.asarray(values, dtype="<f4").reshape(shape))
        tensors.append((name, dtype, shape, raw))
        manifest[name] = {"dtype": dtype, "shape": list(shape),
                          "bits": [int(b) for b in widened_bits(dtype, stored.reshape(-1))]}
    blob = build_file(tensors, {"format": "pt", "writer": "interop.py"})
    with open(os.path.join(folder, "python_tensors.safetensors"), "wb") as f:
        f.write(blob)
    with open(os.path.join(folder, "python_tensors.json"), "w") as f:
        json.dump({"metadata": {"format": "pt", "writer": "interop.py"}, "tensors": manifest}, f)
    return 0


def check_tensors(folder):
    with open(os.path.join(folder, "cpp_tensors.safetensors"), "rb") as f:
        blob = f.read()
    with open(os.path.join(folder, "cpp_tensors.json")) as f:
        manifest = json.load(f)
    header, data, length = parse_file(blob)
    problems = []
    if length % 8 != 0 or not blob[8:8 + length].decode().endswith(("}", " ")):
        problems.append("header length %d not padded to 8" % length)
    metadata = header.pop("__metadata__", {})
    if metadata.get("format") != "pt":
        problems.append("metadata %r lacks format pt" % metadata)
    for key, value in manifest.get("metadata", {}).items():
        if metadata.get(key) != value:
            problems.append("metadata %s = %r, expected %r" % (key, metadata.get(key), value))
    if sorted(header) != sorted(manifest["tensors"]):
        problems.append("names %s, expected %s" % (sorted(header), sorted(manifest["tensors"])))
    # The reference layout: by dtype order (largest first), then by name.
    by_offset = sorted(header, key=lambda n: header[n]["data_offsets"][0])
    expected = sorted(header, key=lambda n: (-DTYPE_ORDER.index(header[n]["dtype"]), n))
    if by_offset != expected:
        problems.append("layout %s, expected %s" % (by_offset, expected))
    for name, want in manifest["tensors"].items():
        if name not in header:
            continue
        entry = header[name]
        if entry["dtype"] != want["dtype"] or entry["shape"] != want["shape"]:
            problems.append("%s: %s %s, expected %s %s" % (name, entry["dtype"], entry["shape"],
                                                           want["dtype"], want["shape"]))
            continue
        begin, end = entry["data_offsets"]
        raw = np.frombuffer(data[begin:end], dtype="<u4" if want["dtype"] == "F32" else "<u2")
        source = np.array(want["source_bits"], dtype="<u4").view("<f4")
        expected_bits, _ = encode(want["dtype"], source)
        bad = np.nonzero(raw != expected_bits)[0]
        if raw.size != expected_bits.size:
            problems.append("%s: %d elements, expected %d" % (name, raw.size, expected_bits.size))
        elif bad.size:
            i = int(bad[0])
            problems.append("%s: %d elements differ, first %d: 0x%x, expected 0x%x (from %r)"
                            % (name, bad.size, i, raw[i], expected_bits[i], float(source[i])))
    for problem in problems:
        print("interop.py: " + problem, file=sys.stderr)
    print("interop.py: checked %d tensors, %d problems" % (len(manifest["tensors"]), len(problems)))
    return 1 if problems else 0


SWITCH_PREFIX = "encoder.block.1.layer.1.mlp."
DENSE_PREFIX = "encoder.block.0.layer.1.DenseReluDense."


def switch_mlp(x, router, wi, wo, capacity):
    """HF SwitchTransformersSparseMLP in evaluation, with switchmoe's rule for dropped tokens.

    x [tokens, d_model]; router [E, d_model]; wi[e] [d_ff, d_model]; wo[e] [d_model, d_ff] (torch
    layouts). The router runs in float32 (HF casts to float32 for it); top-1; one sequence is one
    group whose expert slots fill in token order up to `capacity`; a kept token's output is its
    gate (the raw top-1 probability) times ReLU experts wi, wo; a dropped token's output is 0
    (HF would pass the input through, scaled by the gate; SEMANTICS 1 gives 0).
    Returns (y [tokens, d_model] float64, number of dropped tokens, smallest top-1 margin).
    """
    logits = x.astype(np.float32) @ router.astype(np.float32).T
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    choice = probs.argmax(axis=1)
    ordered = np.sort(probs, axis=1)
    margin = float((ordered[:, -1] - ordered[:, -2]).min())
    load = np.zeros(router.shape[0], dtype=int)
    y = np.zeros(x.shape, dtype=np.float64)
    dropped = 0
    for t in range(x.shape[0]):
        e = choice[t]
        if load[e] >= capacity:
            dropped += 1
            continue
        load[e] += 1
        hidden = np.maximum(wi[e].astype(np.float64) @ x[t].astype(np.float64), 0.0)
        y[t] = float(probs[t, e]) * (wo[e].astype(np.float64) @ hidden)
    return y, dropped, margin


def switch_case():
    """The sparse MLP of the Switch tests: (x, router, wi, wo, dense_wi, dense_wo, capacity)."""
    d_model, d_ff, experts, tokens, capacity = 8, 16, 4, 24, 4
    # Seeds are tried in order until every token's top-1 choice is clear (so float32 rounding
    # differences between numpy and C++ cannot flip it) and some tokens are dropped.
    for seed in range(100):
        rng = np.random.default_rng(1000 + seed)
        x = rng.normal(0, 1, (tokens, d_model)).astype(np.float32)
        router = rng.normal(0, 0.8, (experts, d_model)).astype(np.float32)
        wi = rng.normal(0, 0.3, (experts, d_ff, d_model)).astype(np.float32)
        wo = rng.normal(0, 0.3, (experts, d_model, d_ff)).astype(np.float32)
        dense_wi = rng.normal(0, 0.3, (d_ff, d_model)).astype(np.float32)
        dense_wo = rng.normal(0, 0.3, (d_model, d_ff)).astype(np.float32)
        margins = []
        for dtype in ("F32", "BF16", "F16"):
            rounded = [stored_values(dtype, m) for m in (router, wi, wo)]
            _, dropped, margin = switch_mlp(x, *rounded, capacity)
            margins.append(margin)
        if min(margins) > 1e-3 and dropped > 0:
            break
    else:
        raise RuntimeError("no seed gives clear choices")
    return x, router, wi, wo, dense_wi, dense_wo, capacity


def write_switch(folder):
    x, router, wi, wo, dense_wi, dense_wo, capacity = switch_case()
    (experts, d_ff, d_model) = wi.shape
    for dtype in ("F32", "BF16", "F16"):
        r, i, o = (stored_values(dtype, m) for m in (router, wi, wo))
        di, do = stored_values(dtype, dense_wi), stored_values(dtype, dense_wo)
        y, dropped, _ = switch_mlp(x, r, i, o, capacity)
        dense_y = np.maximum(x.astype(np.float64) @ di.astype(np.float64).T, 0) @ do.T
        tensors = [(SWITCH_PREFIX + "router.classifier.weight", dtype, router.shape,
                    encode(dtype, router)[1])]
        for e in range(experts):
            p = SWITCH_PREFIX + "experts.expert_%d." % e
            tensors.append((p + "wi.weight", dtype, wi[e].shape, encode(dtype, wi[e])[1]))
            tensors.append((p + "wo.weight", dtype, wo[e].shape, encode(dtype, wo[e])[1]))
        tensors.append((DENSE_PREFIX + "wi.weight", dtype, dense_wi.shape,
                        encode(dtype, dense_wi)[1]))
        tensors.append((DENSE_PREFIX + "wo.weight", dtype, dense_wo.shape,
                        encode(dtype, dense_wo)[1]))
        for name, value in (("input", x), ("expected.switch", y), ("expected.dense", dense_y)):
            tensors.append((name, "F32", value.shape, encode("F32", value)[1]))
        metadata = {"format": "pt", "d_model": str(d_model), "d_ff": str(d_ff),
                    "num_experts": str(experts), "expert_capacity": str(capacity),
                    "dropped": str(dropped)}
        with open(os.path.join(folder, "hf_switch_%s.safetensors" % dtype), "wb") as f:
            f.write(build_file(tensors, metadata))
    return 0


SHARDS = 3


def write_sharded(folder):
    """The Switch test's sparse MLP in BF16 as Hugging Face shards it: SHARDS files
    model-0000k-of-00003.safetensors (experts dealt round-robin, the router in the last shard)
    and model.safetensors.index.json; the input and numpy's output in hf_sharded_io.safetensors."""
    x, router, wi, wo, _, _, capacity = switch_case()
    (experts, d_ff, d_model) = wi.shape
    dtype = "BF16"
    r, i, o = (stored_values(dtype, m) for m in (router, wi, wo))
    y, dropped, _ = switch_mlp(x, r, i, o, capacity)
    shards = [[] for _ in range(SHARDS)]
    for e in range(experts):
        p = SWITCH_PREFIX + "experts.expert_%d." % e
        shards[e % SHARDS].append((p + "wi.weight", dtype, wi[e].shape, encode(dtype, wi[e])[1]))
        shards[e % SHARDS].append((p + "wo.weight", dtype, wo[e].shape, encode(dtype, wo[e])[1]))
    shards[-1].append((SWITCH_PREFIX + "router.classifier.weight", dtype, router.shape,
                       encode(dtype, router)[1]))
    weight_map, total = {}, 0
    for k, tensors in enumerate(shards):
        name = "model-%05d-of-%05d.safetensors" % (k + 1, SHARDS)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(build_file(tensors, {"format": "pt"}))
        for tensor in tensors:
            weight_map[tensor[0]] = name
            total += len(tensor[3])
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    io_tensors = [(n, "F32", v.shape, encode("F32", v)[1]) for n, v in (("input", x),
                                                                          ("expected.switch", y))]
    metadata = {"format": "pt", "d_model": str(d_model), "d_ff": str(d_ff),
                "num_experts": str(experts), "expert_capacity": str(capacity),
                "dropped": str(dropped)}
    with open(os.path.join(folder, "hf_sharded_io.safetensors"), "wb") as f:
        f.write(build_file(io_tensors, metadata))
    return 0


def check_sharded(folder):
    """Checks the sharded checkpoint the C++ side wrote (DIR/cpp_sharded/model.safetensors.index
    .json) against DIR/cpp_sharded.json, the float32 bits of every tensor: each shard a valid
    file, each tensor in the shard the index names and in no other, total_size the bytes of data,
    every element bit for bit."""
    with open(os.path.join(folder, "cpp_sharded.json")) as f:
        manifest = json.load(f)
    root = os.path.join(folder, "cpp_sharded")
    with open(os.path.join(root, "model.safetensors.index.json")) as f:
        index = json.load(f)
    weight_map = index["weight_map"]
    problems, seen, total = [], {}, 0
    for shard in sorted(set(weight_map.values())):
        if "/" in shard or shard in (".", ".."):
            problems.append("shard name %r leaves the folder" % shard)
            continue
        with open(os.path.join(root, shard), "rb") as f:
            header, data, _ = parse_file(f.read())
        header.pop("__metadata__", None)
        for name, entry in header.items():
            if name in seen:
                problems.append("%s in %s and %s" % (name, seen[name], shard))
            seen[name] = shard
            if weight_map.get(name) != shard:
                problems.append("%s is in %s, the index says %s" % (name, shard,
                                                                    weight_map.get(name)))
            begin, end = entry["data_offsets"]
            total += end - begin
            want = manifest.get(name)
            if want is None:
                problems.append("%s is not in the manifest" % name)
                continue
            got = np.frombuffer(data[begin:end], dtype="<u4")
            if entry["dtype"] != "F32" or entry["shape"] != want["shape"] or \
                    got.tolist() != want["bits"]:
                problems.append("%s: %s %s differs from the manifest" % (name, entry["dtype"],
                                                                          entry["shape"]))
    if sorted(seen) != sorted(manifest) or sorted(weight_map) != sorted(manifest):
        problems.append("tensors %s, index %s, expected %s" % (sorted(seen), sorted(weight_map),
                                                               sorted(manifest)))
    if index.get("metadata", {}).get("total_size") != total:
        problems.append("total_size %r, the shards hold %d bytes" % (
            index.get("metadata", {}).get("total_size"), total))
    for problem in problems:
        print("interop.py: " + problem, file=sys.stderr)
    print("interop.py: checked %d sharded tensors, %d problems" % (len(manifest), len(problems)))
    return 1 if problems else 0


MIXTRAL_PREFIX = "model.layers.0.block_sparse_moe."
BF16_UNIT_ROUNDOFF = 2.0 ** -8  # bfloat16 keeps 8 significant bits; round to nearest


def silu(z):
    return z / (1.0 + np.exp(-z))


def mixtral_block(x, gate, w1, w3, w2, top_k, rounded_weights):
    """HF MixtralSparseMoeBlock: router logits x gate^T, softmax in float32, top-k, the k weights
    renormalized to sum 1, each expert (silu(x w1^T) * (x w3^T)) w2^T; no capacity, no biases.

    x [tokens, d_model]; gate [E, d_model]; w1[e], w3[e] [d_ff, d_model]; w2[e] [d_model, d_ff]
    (torch layouts). Returns (y [tokens, d_model] float64; the bound on |y_bf16 - y| of a layer
    that rounds its expert inputs and hidden activations to bfloat16 (and its weights, when
    `rounded_weights`) and accumulates in float32; the smallest gap between the k-th and the
    (k+1)-th probability of a token).

    The bound is first order in the unit roundoff u: an input rounded to x(1 + d), |d| <= u,
    moves a = w1 x by at most u |w1| |x| (2u with w1 rounded too), likewise b = w3 x; then
    h = silu(a) b moves by |silu'(a)| |b| da + |silu(a)| db, silu' being at most 1.1, plus u |h|
    for rounding h; y = sum of g w2 h moves by g (|w2| dh + [u |w2| |h|]). Times 1.25 for the
    second-order terms (O(u^2)) and float32 accumulation (O(d_ff 2^-24)), both far smaller.
    """
    logits = x.astype(np.float32) @ gate.astype(np.float32).T
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = (np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)).astype(np.float32)
    order = np.argsort(-probs, axis=1, kind="stable")
    ordered = np.take_along_axis(probs, order, axis=1)
    margin = float((ordered[:, top_k - 1] - ordered[:, top_k]).min())
    u = BF16_UNIT_ROUNDOFF
    w_u = u if rounded_weights else 0.0
    y = np.zeros(x.shape, dtype=np.float64)
    bound = np.zeros(x.shape, dtype=np.float64)
    for t in range(x.shape[0]):
        chosen = order[t, :top_k]
        weights = probs[t, chosen] / probs[t, chosen].sum()  # float32, as HF computes it
        xt = x[t].astype(np.float64)
        for e, g in zip(chosen, weights.astype(np.float64)):
            w1e, w3e, w2e = (w[e].astype(np.float64) for w in (w1, w3, w2))
            a, b = w1e @ xt, w3e @ xt
            h = silu(a) * b
            y[t] += g * (w2e @ h)
            da = (u + w_u) * (np.abs(w1e) @ np.abs(xt))
            db = (u + w_u) * (np.abs(w3e) @ np.abs(xt))
            dh = 1.1 * np.abs(b) * da + np.abs(silu(a)) * db + u * np.abs(h)
            bound[t] += g * (np.abs(w2e) @ dh + w_u * (np.abs(w2e) @ np.abs(h)))
    return y, 1.25 * bound, margin


def mixtral_case():
    """A small Mixtral block: (x, gate, w1, w3, w2, top_k), E=4, top-2, d_model 8, d_ff 12."""
    d_model, d_ff, experts, tokens, top_k = 8, 12, 4, 10, 2
    # Seeds are tried in order until every token's top-2 set is clear (the 2nd and 3rd
    # probabilities apart), so float32 rounding differences cannot change a choice.
    for seed in range(100):
        rng = np.random.default_rng(5000 + seed)
        x = rng.normal(0, 1, (tokens, d_model)).astype(np.float32)
        gate = rng.normal(0, 0.8, (experts, d_model)).astype(np.float32)
        w1 = rng.normal(0, 0.4, (experts, d_ff, d_model)).astype(np.float32)
        w3 = rng.normal(0, 0.4, (experts, d_ff, d_model)).astype(np.float32)
        w2 = rng.normal(0, 0.4, (experts, d_model, d_ff)).astype(np.float32)
        margins = [mixtral_block(x, *(stored_values(dtype, m) for m in (gate, w1, w3, w2)),
                                 top_k, False)[2] for dtype in ("F32", "BF16")]
        if min(margins) > 1e-3:
            return x, gate, w1, w3, w2, top_k
    raise RuntimeError("no seed gives clear choices")


def write_mixtral(folder):
    x, gate, w1, w3, w2, top_k = mixtral_case()
    (experts, d_ff, d_model) = w1.shape
    for dtype in ("F32", "BF16"):
        g, a, b, c = (stored_values(dtype, m) for m in (gate, w1, w3, w2))
        y, bound, _ = mixtral_block(x, g, a, b, c, top_k, rounded_weights=dtype == "F32")
        tensors = [(MIXTRAL_PREFIX + "gate.weight", dtype, gate.shape, encode(dtype, gate)[1])]
        for e in range(experts):
            p = MIXTRAL_PREFIX + "experts.%d." % e
            for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
                tensors.append((p + name + ".weight", dtype, w[e].shape, encode(dtype, w[e])[1]))
        for name, value in (("input", x), ("expected.mixtral", y), ("tolerance.bf16", bound)):
            tensors.append((name, "F32", value.shape, encode("F32", value)[1]))
        metadata = {"format": "pt", "d_model": str(d_model), "d_ff": str(d_ff),
                    "num_experts": str(experts), "top_k": str(top_k)}
        with open(os.path.join(folder, "hf_mixtral_%s.safetensors" % dtype), "wb") as f:
            f.write(build_file(tensors, metadata))
    return 0


def stored_values(dtype, values):
    """float32 `values` as a reader gets them back from `dtype` storage."""
    stored, _ = encode(dtype, values)
    return widened_bits(dtype, stored.reshape(-1)).view("<f4").reshape(np.shape(values))


def write_corpus(folder):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(7)
    files = {}
    good = [("a", "F32", (2, 3), encode("F32", rng.normal(size=(2, 3)))[1]),
            ("b", "BF16", (3,), encode("BF16", rng.normal(size=3))[1]),
            ("c", "F16", (1, 2), encode("F16", rng.normal(size=(1, 2)))[1]),
            ("d", "F32", (2, 1, 2), encode("F32", rng.normal(size=4))[1]),
            ("e", "I32", (2,), b"\x01\x00\x00\x00\x02\x00\x00\x00"),
            ("z", "F32", (0,), b"")]
    files["valid"] = build_file(good, {"format": "pt"})
    files["valid_unpadded"] = build_file(good[:2], None, pad=False)
    files["empty"] = build_file([], {"format": "pt"})
    files["nan"] = build_file([("n", "F32", (2,), struct.pack("<ff", 1.0, float("nan")))])
    valid = files["valid"]
    files["short"] = valid[:5]
    files["truncated"] = valid[:-3]
    files["trailing"] = valid + b"\0"
    files["huge_length"] = struct.pack("<Q", 2 ** 40) + valid[8:]
    files["not_json"] = struct.pack("<Q", 6) + b"{\"a\":]"
    files["not_utf8"] = struct.pack("<Q", 8) + b"{\"\xff\":1} "
    files["duplicate"] = (lambda t: struct.pack("<Q", len(t)) + t + b"\0" * 8)(
        b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}')
    files["hole"] = (lambda t: struct.pack("<Q", len(t)) + t + b"\0" * 8)(
        b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}')
    files["overflow"] = (lambda t: struct.pack("<Q", len(t)) + t)(
        b'{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}')
    files["metadata_number"] = (lambda t: struct.pack("<Q", len(t)) + t)(
        b'{"__metadata__":{"step":1}}')
    files["number_overflow"] = (lambda t: struct.pack("<Q", len(t)) + t)(
        b'{"w":{"dtype":"F32","shape":[1e999],"data_offsets":[0,0]}}')  # found by the fuzzer
    for name, blob in files.items():
        with open(os.path.join(folder, name + ".safetensors"), "wb") as f:
            f.write(blob)
    print("interop.py: %d corpus files in %s" % (len(files), folder))
    return 0


def main(argv):
    commands = {"write-tensors": write_tensors, "check-tensors": check_tensors,
                "write-switch": write_switch, "write-sharded": write_sharded,
                "check-sharded": check_sharded, "write-mixtral": write_mixtral,
                "corpus": write_corpus}
    if len(argv) != 3 or argv[1] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    return commands[argv[1]](argv[2])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
