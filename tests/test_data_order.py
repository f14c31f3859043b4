"""--shuffle's data order against llm.c's train_gpt2.c (HEAD f1e2ace): the DataLoader's order
against a loader written here from llmc/dataloader.h and llmc/rand.h, on a Mersenne Twister
written here in pure Python (itself checked against NumPy's legacy RandomState), and the
windows llm.c's CPU demo reads on a 349,465-token file (shared/README.md, measured)."""
import numpy as np

from llmpy.data.loader import DataLoader, bundled_data, read_tokens, write_tokens


class MT19937:
    """Matsumoto and Nishimura's generator, as llm.c's rand.h (manual_seed, randint32)."""

    def __init__(self, seed):
        self.mt = [seed & 0xFFFFFFFF]
        for i in range(1, 624):
            self.mt.append((1812433253 * (self.mt[-1] ^ (self.mt[-1] >> 30)) + i) & 0xFFFFFFFF)
        self.index = 624

    def randint32(self):
        if self.index == 624:
            for i in range(624):
                y = (self.mt[i] & 0x80000000) | (self.mt[(i + 1) % 624] & 0x7FFFFFFF)
                self.mt[i] = self.mt[(i + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            self.index = 0
        y = self.mt[self.index]
        self.index += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        return y ^ (y >> 18)


def permute(data, rng):
    for i in range(len(data) - 1, 0, -1):
        j = rng.randint32() % (i + 1)
        data[i], data[j] = data[j], data[i]


def llmc_starts(sizes, B, T, rank, world, batches):
    """The first token of each batch llm.c's shuffled DataLoader serves, as
    (shard, token offset): dataloader_init, dataloader_reset, dataloader_next_batch."""
    rng = MT19937(42 + rank)
    shard_indices = list(range(len(sizes)))
    out = []
    current_shard, current_sample, samples, intra = 0, 0, 0, []

    def load(i):      # dataloader_load_shard_ + prepare_intra_shard_indices_
        nonlocal samples, intra
        samples = (sizes[shard_indices[i]] - 1) // (world * B * T)
        intra = list(range(samples))
        permute(intra, rng)

    def reset():
        nonlocal current_shard, current_sample
        current_shard, current_sample = 0, 0
        permute(shard_indices, rng)
        load(0)
    reset()
    for _ in range(batches):
        if current_sample >= samples:                          # dataloader_advance_
            if current_shard == len(sizes) - 1:
                reset()
            else:
                current_shard, current_sample = current_shard + 1, 0
                load(current_shard)
        idx = intra[current_sample]
        out.append((shard_indices[current_shard], idx * world * B * T + rank * B * T))
        current_sample += 1
    return out


def test_mt19937_is_the_reference_generator():
    """The test's generator gives NumPy's legacy RandomState's raw draws (the same
    init_genrand seeding), so two independent implementations agree."""
    ours = MT19937(42)
    theirs = np.random.RandomState(42).randint(0, 2 ** 32, size=1300, dtype=np.uint32)
    assert [ours.randint32() for _ in range(1300)] == theirs.tolist()


def test_llmc_demo_windows():
    """The bundled train split has tinyshakespeare's 349,465 tokens: 1,365 windows of 4*64, and
    llm.c's demo reads windows 367, 585, ... at steps 0-11 (measured, shared/README.md)."""
    path = bundled_data("shakespeare_train.bin")
    assert read_tokens(path).size == 349465
    loader = DataLoader(path, 4, 64, shuffle=True, seed=42)
    tokens = read_tokens(path)
    windows = [367, 585, 450, 657, 1352, 1183, 447, 1144, 1169, 1145, 930, 880]
    for k in windows:
        x, y = loader.next_batch()
        np.testing.assert_array_equal(x.ravel(), tokens[k * 256:k * 256 + 256])
        np.testing.assert_array_equal(y.ravel(), tokens[k * 256 + 1:k * 256 + 257])
    # and on, through the wrap into the second epoch, as the reference loader
    want = llmc_starts([349465], 4, 64, 0, 1, 1365 + 40)
    loader.reset()
    got = [loader.next_batch()[0][0, :8].tolist() for _ in range(1365 + 40)]
    assert got == [tokens[o:o + 8].tolist() for _, o in want]


def test_order_over_shards_epochs_ranks_and_resume(tmp_path):
    """Shards of unequal sizes over three epochs on two ranks: the shard order is permuted in
    place every epoch, the windows of each shard as it opens; a loader resumed from any
    position continues the same order."""
    sizes = [301, 97, 161, 45]
    for i, n in enumerate(sizes):     # token value = shard * 1000 + position: where it came from
        write_tokens(tmp_path / f"d_{i}.bin", np.arange(n) + 1000 * i)
    B, T, world = 2, 4, 2
    for rank in range(world):
        loader = DataLoader(str(tmp_path / "d_*.bin"), B, T, shuffle=True, rank=rank,
                            world=world)
        per_epoch = sum((n - 1) // (world * B * T) for n in sizes)
        n = 3 * per_epoch + 5
        want = llmc_starts(sizes, B, T, rank, world, n)
        got = []
        for step in range(n):
            if step in (7, 2 * per_epoch + 1):
                state = loader.state()
                loader = DataLoader(str(tmp_path / "d_*.bin"), B, T, shuffle=True, rank=rank,
                                    world=world)
                loader.load_state(state)
            first = int(loader.next_batch()[0][0, 0])
            got.append((first // 1000, first % 1000))
        assert got == want
