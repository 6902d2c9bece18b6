"""The BPE merge loop, shared by llama2.c's score-ranked merges and GPT-2's merges list."""
import heapq


def merge_pairs(symbols, best):
    """The BPE loop: join the best adjacent pair, again and again, until no pair can be joined.

    best(a, b) -> (priority, joined) when the pair may be joined, else None; the lowest priority
    joins first, the leftmost pair on ties. (llama2.c ranks pairs by their piece's score,
    GPT-2-style BPE by the pair's place in the merges list.)

    Rescanning the whole list for the best pair after every join is quadratic in its length.
    Instead the symbols form a linked list (positions never move; right[i] is the next live
    position, left[i] the previous one), and a heap holds every joinable pair as
    (priority, position, a, b, joined), so its top is the next join. A join only changes the two
    pairs around it; an older entry that no longer matches the list is skipped when it comes up.
    """
    symbols = list(symbols)             # symbols[i]: the symbol at position i; None once joined
    n = len(symbols)
    left = list(range(-1, n - 1))       # -1 before the first
    right = list(range(1, n + 1))       # n after the last
    heap = []

    def push_pair(i):
        """Offer the pair (i, right[i]) to the heap if there is one and it may be joined."""
        if 0 <= i and right[i] < n:
            a, b = symbols[i], symbols[right[i]]
            rule = best(a, b)
            if rule is not None:
                heapq.heappush(heap, (rule[0], i, a, b, rule[1]))

    for i in range(n - 1):
        push_pair(i)
    while heap:
        _, i, a, b, joined = heapq.heappop(heap)
        j = right[i]
        if symbols[i] != a or j >= n or symbols[j] != b:
            continue                    # stale: position i or its neighbour changed since
        symbols[i], symbols[j] = joined, None       # i absorbs j ...
        right[i] = right[j]                         # ... and j leaves the list
        if right[i] < n:
            left[right[i]] = i
        push_pair(left[i])              # the two pairs that now contain the joined symbol
        push_pair(i)
    return [s for s in symbols if s is not None]
