import threading

from datatether.engine.pathlocks import PathLocks


def test_holding_many_paths_in_any_order_never_deadlocks_and_excludes():
    locks = PathLocks(stripes=4)
    counter = {"n": 0, "inside": 0, "max_inside": 0}
    paths = [f"p{i}" for i in range(10)]

    def worker(order):
        for _ in range(300):
            with locks.hold(*order):
                counter["inside"] += 1
                counter["max_inside"] = max(counter["max_inside"], counter["inside"])
                counter["n"] += 1
                counter["inside"] -= 1

    threads = [threading.Thread(target=worker, args=(paths if i % 2 else paths[::-1],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert counter["n"] == 1800 and counter["max_inside"] == 1
