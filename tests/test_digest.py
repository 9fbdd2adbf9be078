import os

from datatether.engine import digest


def test_sparse_and_dense_files_with_same_bytes_have_same_digest(tmp_path):
    sparse, dense = tmp_path / "sparse", tmp_path / "dense"
    with open(sparse, "wb") as f:
        f.truncate(3 * digest.DIGEST_BLOCK + 5)
        f.seek(digest.DIGEST_BLOCK)
        f.write(b"x")
    data = bytearray(3 * digest.DIGEST_BLOCK + 5)
    data[digest.DIGEST_BLOCK] = ord("x")
    dense.write_bytes(bytes(data))
    assert digest.path_digest(sparse) == digest.path_digest(dense)


def test_digest_changes_with_content_and_size(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(os.urandom(200_000))
    d1 = digest.path_digest(p)
    with open(p, "r+b") as f:
        f.seek(150_000)
        f.write(b"!")
    assert digest.path_digest(p) != d1
    # trailing zeros change the size, so the digest too
    q = tmp_path / "q"
    q.write_bytes(b"")
    r = tmp_path / "r"
    r.write_bytes(b"\0")
    assert digest.path_digest(q) != digest.path_digest(r)


def test_file_digest_is_combination_of_block_digests(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(os.urandom(5 * digest.DIGEST_BLOCK + 17))
    fd = os.open(p, os.O_RDONLY)
    try:
        blocks = digest.block_digests(fd, os.fstat(fd).st_size)
        assert len(blocks) == 6
        assert digest.combine(blocks, os.fstat(fd).st_size) == digest.file_digest(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _dense_digest(pieces: list[tuple[int, bytes]], size: int) -> bytes:
    data = bytearray(size)
    for offset, piece in pieces:
        data[offset:offset + len(piece)] = piece
    blocks = [digest.block_digest(bytes(data[i:i + digest.DIGEST_BLOCK]))
              for i in range(0, size, digest.DIGEST_BLOCK)]
    return digest.combine(blocks, size)


def test_a_stream_of_pieces_with_holes_gives_the_file_digest():
    import random
    rng = random.Random(7)
    block = digest.DIGEST_BLOCK
    for _ in range(200):
        pieces, position = [], 0
        for _ in range(rng.randrange(0, 6)):
            position += rng.choice([0, 0, 1, 4096, block - 1, block, 3 * block + 5])
            piece = rng.randbytes(rng.choice([1, 100, block - 3, block, block + 1, 2 * block + 77]))
            pieces.append((position, piece))
            position += len(piece)
        size = position + rng.choice([0, 1, block, 2 * block + 3])
        stream = digest.Stream()
        for offset, piece in pieces:
            stream.feed(offset, memoryview(piece))
        assert stream.finish(size) == _dense_digest(pieces, size)


def test_a_stream_fed_out_of_order_or_past_the_size_gives_nothing():
    backwards = digest.Stream()
    backwards.feed(100, b"x" * 50)
    backwards.feed(120, b"y")
    assert backwards.finish(200) is None
    too_long = digest.Stream()
    too_long.feed(0, b"x" * 50)
    assert too_long.finish(49) is None
