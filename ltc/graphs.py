"""Periodic crystal graphs: pymatgen ``Structure`` → atomic numbers, edges, distances, edge vectors.

Three constructions (``GraphConfig.construction``, one of ``CONSTRUCTIONS``):

- ``"knn"``: each atom is joined to its ``max_neighbors`` nearest periodic images within ``cutoff`` Å
  (CGCNN's rule; MEGNet-style models use 4–5 Å). Exactly k directed edges per atom (fewer if the cutoff
  holds fewer), none if it holds none (an "isolated atom" error).
- ``"jarvis"``: the graphs ALIGNN, and so Devi et al., trained on: jarvis-tools'
  ``nearest_neighbor_edges(use_canonize=True)`` then ``build_undirected_edgedata`` (``jarvis/core/graphs.py``),
  reproduced edge for edge (see ``_jarvis_graph``; tested against jarvis-tools itself). Every atom keeps
  every neighbour out to its k-th neighbour's distance, and each kept bond becomes an edge in both
  directions. An atom with fewer than k neighbours within ``cutoff`` makes jarvis enlarge the cutoff until
  every atom has k, so the edges do not depend on ``cutoff`` (it is only jarvis's first search radius).
- ``"chgnet"``: CHGNet's own graphs, built by its ``CrystalGraphConverter`` (the ``chgnet`` package): every
  neighbour within ``cutoff`` (CHGNet 0.3.0: 6 Å), each bond in both directions, plus CHGNet's bond graph: the
  angles between bonds shorter than ``bond_cutoff`` (3 Å) that share an atom (``CrystalGraph.angle_edges``) and
  the map from directed edges to bonds (``CrystalGraph.directed2undirected``). ``max_neighbors`` does not apply.

Neighbours come from pymatgen's vectorised ``Structure.get_neighbor_list`` (first over a smaller radius that
usually holds the nearest k, see ``_neighbor_list``); the selection is array code, with no per-site loop.
("chgnet": CHGNet's converter calls the same neighbour list, then builds its bond graph in its own code.)

Edges follow PyG's ``source_to_target`` flow: ``edge_index[0]`` is the neighbour j, ``edge_index[1]``
the centre i, and ``vectors[e] = r_j + image - r_i``. Edges are grouped by centre, nearest first ("chgnet": in
the converter's order, which its bond graph indexes); ties in distance are broken by the edge vector, so "knn"
gives equal environments equal edges wherever they sit (translated copies, supercells). "jarvis" decides ties at
the k-th distance as jarvis does, on the last bits of its float64 distances, so there a translated copy or a
supercell can keep other members of a tied shell.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ltc.errors import ConfigError

MAX_Z = 100  # CGCNN's feature table covers H (1) … Fm (100)

# How edges are chosen (GraphConfig.construction): name → one line for help texts. See the module docstring.
CONSTRUCTIONS = {
    "knn": "each atom's max_neighbors nearest within the cutoff, directed",
    "jarvis": "ALIGNN's graphs (jarvis-tools' k-nearest edges): every neighbour out to the k-th one's distance, "
    "undirected, the cutoff enlarged where an atom has fewer than k",
    "chgnet": "CHGNet's graphs (its CrystalGraphConverter): every neighbour within the cutoff, undirected, and the "
    "angles between bonds shorter than the bond cutoff (needs the chgnet package)",
}
# CHGNet's bond graph joins bonds shorter than this (Å; chgnet's ``bond_graph_cutoff``, 3 Å in every released model)
CHGNET_BOND_CUTOFF = 3.0
# CHGNet's atom embedding covers H (1) … Pu (94)
CHGNET_MAX_Z = 94


@dataclass(frozen=True)
class GraphConfig:
    """How graphs are built. Part of the shard cache key.

    ``construction`` defaults to "knn", the construction of every graph ltc built before "jarvis" existed,
    so settings and checkpoints written without it keep their meaning. ``bond_cutoff`` belongs to "chgnet"
    only (default ``CHGNET_BOND_CUTOFF``) and is left out of ``to_dict`` elsewhere, so the settings, and the
    shard keys, of "knn" and "jarvis" graphs are what they were before it existed.
    """

    cutoff: float = 8.0  # Å; "jarvis": only the first search radius (see the module docstring)
    max_neighbors: int = 12  # "chgnet": does not apply (every neighbour within the cutoff), must stay 12
    construction: str = "knn"  # one of CONSTRUCTIONS
    bond_cutoff: float | None = None  # Å, "chgnet" only: bonds shorter than this form CHGNet's bond graph

    def __post_init__(self) -> None:
        if isinstance(self.cutoff, bool) or not isinstance(self.cutoff, (int, float)) or not self.cutoff > 0:
            raise ConfigError(f"cutoff={self.cutoff!r} must be a number > 0 (Å)")
        if isinstance(self.max_neighbors, bool) or not isinstance(self.max_neighbors, int) or self.max_neighbors < 1:
            raise ConfigError(f"max_neighbors={self.max_neighbors!r} must be an integer >= 1")
        if self.construction not in CONSTRUCTIONS:
            raise ConfigError(f"construction={self.construction!r} must be one of {list(CONSTRUCTIONS)}")
        object.__setattr__(self, "cutoff", float(self.cutoff))
        if self.construction != "chgnet":
            if self.bond_cutoff is not None:
                raise ConfigError(f"bond_cutoff={self.bond_cutoff!r} goes with construction 'chgnet' only")
            return
        default = GraphConfig.__dataclass_fields__["max_neighbors"].default
        if self.max_neighbors != default:
            raise ConfigError(
                f"max_neighbors={self.max_neighbors!r} does not apply to construction 'chgnet', which keeps every "
                f"neighbour within the cutoff; leave it at {default}"
            )
        bond = CHGNET_BOND_CUTOFF if self.bond_cutoff is None else self.bond_cutoff
        if isinstance(bond, bool) or not isinstance(bond, (int, float)) or not 0 < bond <= self.cutoff:
            raise ConfigError(f"bond_cutoff={bond!r} must be a number > 0 and <= cutoff={self.cutoff} (Å)")
        object.__setattr__(self, "bond_cutoff", float(bond))

    def to_dict(self) -> dict[str, float | int | str]:
        out = asdict(self)
        if out["bond_cutoff"] is None:  # not a setting of this construction (and not in old keys)
            del out["bond_cutoff"]
        return out

    @property
    def line_graph_backtracking(self) -> bool:
        """Whether a line graph of these graphs keeps bond pairs a→b→a (back along the same bond).

        The reference does (DGL's ``line_graph(shared=True)`` keeps them by default); ltc's line graph of
        "knn" graphs has always dropped them, and keeps doing so for the models trained that way.
        """
        return self.construction == "jarvis"


class GraphError(ValueError):
    """A structure that cannot become a graph. The message, ``"<kind>: <detail>"``, is its rejected reason."""


@dataclass(frozen=True)
class CrystalGraph:
    """One crystal graph as numpy arrays (n atoms, E edges; "chgnet": U = E / 2 bonds, A angles)."""

    z: np.ndarray  # [n] uint8 atomic numbers
    edge_index: np.ndarray  # [2, E] int32: row 0 neighbour j (source), row 1 centre i (target)
    distances: np.ndarray  # [E] float32, Å
    vectors: np.ndarray  # [E, 3] float32, Å, r_j + image - r_i
    # "chgnet" only (None otherwise): CHGNet's bond graph, in its own indexing
    directed2undirected: np.ndarray | None = None  # [E] int32: the bond (0 … U-1) of each directed edge
    angle_edges: np.ndarray | None = None  # [A, 2] int32: the two directed edges of an angle, both from its centre

    @property
    def num_nodes(self) -> int:
        return int(self.z.shape[0])

    @property
    def num_edges(self) -> int:
        return int(self.distances.shape[0])

    def to_bytes(self) -> bytes:
        """The arrays packed as raw bytes behind a header of their lengths (no pickle): how a graph travels between
        processes (``ltc screen``'s graph tasks to its inference actors)."""
        bonds = self.angle_edges is not None
        n_angles = len(self.angle_edges) if bonds else 0
        head = np.array([self.num_nodes, self.num_edges, n_angles, int(bonds)], dtype=np.int64)
        parts = [head, self.z.astype(np.uint8), self.edge_index.astype(np.int32), self.distances.astype(np.float32),
                 self.vectors.astype(np.float32)]  # fmt: skip
        if bonds:
            parts += [self.directed2undirected.astype(np.int32), self.angle_edges.astype(np.int32)]  # type: ignore[union-attr]
        return b"".join(a.tobytes() for a in parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> CrystalGraph:
        n, e, a, bonds = (int(x) for x in np.frombuffer(data, dtype=np.int64, count=4))
        at = 32

        def take(dtype: type, count: int) -> np.ndarray:
            nonlocal at
            out = np.frombuffer(data, dtype=dtype, count=count, offset=at)
            at += out.nbytes
            return out

        z, edges, dist, vec = take(np.uint8, n), take(np.int32, 2 * e), take(np.float32, e), take(np.float32, 3 * e)
        extra = {}
        if bonds:
            extra = {"directed2undirected": take(np.int32, e), "angle_edges": take(np.int32, 2 * a).reshape(a, 2)}
        if at != len(data):
            raise ValueError(f"a packed graph of {len(data)} bytes, read {at}")
        return cls(z=z, edge_index=edges.reshape(2, e), distances=dist, vectors=vec.reshape(e, 3), **extra)


# Tie-breaking direction: among neighbours at the same distance, the order is that of their edge
# vectors projected on this generic direction, so equal environments keep equal edges wherever they sit.
_TIE_DIRECTION = np.array([1.0, 0.5772156649, 0.2718281828])
# The projection enters the sort key scaled by this much (1/Å): far above float64 noise in distances
# (~1e-15 Å) and far below any physical distance difference (a neighbour 1e-7 Å nearer counts as a tie).
_TIE_SCALE = 1e-8


# A first search radius is sized to hold this many times max_neighbors atoms at the cell's mean density.
# Neighbour search costs grow with r^3, and at 8 Å an atom has ~100 neighbours of which 12 are kept.
# None searches the full cutoff at once.
PROBE_FACTOR: float | None = 2.0
_PROBE_MARGIN = 1e-3  # Å; the k-th neighbour must lie this far inside the probe radius


def _neighbor_list(structure, config: GraphConfig) -> tuple[np.ndarray, ...]:
    """pymatgen's neighbour list holding at least every atom's ``max_neighbors`` nearest within cutoff.

    Tries a smaller radius first. Its result is used only if every atom has ``max_neighbors``
    neighbours strictly inside it: then the nearest k, and every neighbour tied with the k-th, are in it,
    and the kept edges are exactly those of the full-cutoff search. Otherwise the full cutoff is searched.
    """
    if PROBE_FACTOR is not None:
        k = config.max_neighbors
        probe = (3.0 * PROBE_FACTOR * k * structure.volume / len(structure) / (4.0 * np.pi)) ** (1.0 / 3.0)
        if probe < config.cutoff:
            found = structure.get_neighbor_list(probe)
            inside = np.bincount(found[0][found[3] < probe - _PROBE_MARGIN], minlength=len(structure))
            if inside.min() >= k:
                return found
    return structure.get_neighbor_list(config.cutoff)


def structure_to_graph(structure, *, config: GraphConfig = GraphConfig()) -> CrystalGraph:
    """Build the periodic graph of a pymatgen ``Structure`` by ``config.construction``.

    Raises ``GraphError`` for an empty or disordered structure, an element outside H…Fm, and ("knn") an
    atom with no neighbour within ``config.cutoff`` or ("jarvis") fewer than k within ``JARVIS_MAX_RADIUS``.
    """
    n = len(structure)
    if n == 0:
        raise GraphError("empty structure: no sites")
    try:
        species = [site.specie for site in structure]
    except AttributeError:  # pymatgen's ``site.specie`` exists only for ordered sites
        bad = next(i for i, site in enumerate(structure) if not site.is_ordered)
        raise GraphError(
            f"disordered site: site {bad} is {structure[bad].species}; ltc needs ordered structures"
        ) from None
    from pymatgen.core import Element

    unknown = next((i for i, sp in enumerate(species) if not isinstance(getattr(sp, "element", sp), Element)), None)
    if unknown is not None:  # pymatgen reads an unknown symbol ("Xx") as a dummy species with a meaningless Z
        raise GraphError(f"unknown element: site {unknown} is {species[unknown]!s}, not an element")
    z = np.fromiter((sp.Z for sp in species), dtype=np.int64, count=n)
    if z.min() < 1 or z.max() > MAX_Z:
        bad_z = int(z[(z < 1) | (z > MAX_Z)][0])
        raise GraphError(f"element outside H..Fm: Z={bad_z} is not in the CGCNN feature table (1..{MAX_Z})")
    if config.construction == "jarvis":
        return _jarvis_graph(structure, z, config)
    if config.construction == "chgnet":
        return _chgnet_graph(structure, z, config)
    return _knn_graph(structure, z, config)


def check_construction(config: GraphConfig) -> None:
    """Raise ConfigError if ``config.construction`` needs a package that is not installed.

    Called before graphs are built, so a missing package is one error, not a rejected row per structure.
    """
    if config.construction == "chgnet" and importlib.util.find_spec("chgnet") is None:
        raise ConfigError("construction 'chgnet' needs the chgnet package: pip install 'ltc[chgnet]'")


def _knn_graph(structure, z: np.ndarray, config: GraphConfig) -> CrystalGraph:
    """Each atom's ``max_neighbors`` nearest within the cutoff, as directed edges (``"knn"``)."""
    n = len(structure)
    centre, nbr, images, dist = _neighbor_list(structure, config)
    cart = structure.cart_coords
    lattice = structure.lattice.matrix

    # One float sort key groups edges by centre, nearest first, ties in distance broken by the edge
    # vector's projection. The projection needs three 1-D gathers, not the full [E, 3] vectors, which
    # are computed only for the edges that are kept (about 1 in 10 at 8 Å).
    p = cart @ _TIE_DIRECTION
    proj = p[nbr] - p[centre] + images @ (lattice @ _TIE_DIRECTION)
    key = centre * (2.0 * config.cutoff + 1.0) + dist + proj * _TIE_SCALE
    order = np.argsort(key)
    centre = centre[order]

    counts = np.bincount(centre, minlength=n)
    if (counts == 0).any():
        lonely = np.flatnonzero(counts == 0)
        names = ", ".join(f"{i} ({structure[int(i)].specie})" for i in lonely[:5])
        more = f" and {len(lonely) - 5} more" if len(lonely) > 5 else ""
        raise GraphError(f"isolated atom: no neighbour within cutoff={config.cutoff} Å for atom {names}{more}")
    rank = np.arange(centre.shape[0]) - (np.cumsum(counts) - counts)[centre]
    within_k = rank < config.max_neighbors
    kept = order[within_k]
    centre, nbr = centre[within_k], nbr[kept]
    vectors = cart[nbr] + images[kept] @ lattice - cart[centre]

    return CrystalGraph(
        z=z.astype(np.uint8),
        edge_index=np.stack([nbr, centre]).astype(np.int32),
        distances=dist[kept].astype(np.float32),
        vectors=vectors.astype(np.float32),
    )


# jarvis-tools' ``Atoms.get_all_neighbors`` skips pairs closer than its ``bond_tol`` (Å); so does "jarvis".
JARVIS_BOND_TOL = 0.15
# jarvis enlarges its cutoff without limit until every atom has k neighbours; ltc stops here (Å), so a
# structure that is mostly vacuum is a rejected row rather than an endless search.
JARVIS_MAX_RADIUS = 100.0
_JARVIS_LATTICE_DECIMALS = 5  # jarvis.core.lattice.Lattice(round_off=5)


def _jarvis_candidates(structure, config: GraphConfig) -> tuple[np.ndarray, ...]:
    """pymatgen's neighbour list over a radius that holds every atom's k nearest (beyond the bond tolerance).

    jarvis enlarges its cutoff (to the longest cell edge, then doubling) while any atom has fewer than k
    neighbours within it. Once every atom has k, each keeps its neighbours out to its own k-th distance,
    so the edges are the same for any radius that holds them: ltc searches the smallest it can find.
    """
    k, n = config.max_neighbors, len(structure)
    if PROBE_FACTOR is not None:
        radius = (3.0 * PROBE_FACTOR * k * structure.volume / n / (4.0 * np.pi)) ** (1.0 / 3.0)
    else:
        radius = config.cutoff
    radius = min(radius, JARVIS_MAX_RADIUS)
    while True:
        found = structure.get_neighbor_list(radius)
        d = found[3]
        inside = (d > JARVIS_BOND_TOL + _PROBE_MARGIN) & (d < radius - _PROBE_MARGIN)
        counts = np.bincount(found[0][inside], minlength=n)
        if counts.min() >= k:
            return found
        if radius >= JARVIS_MAX_RADIUS:
            sparse = np.flatnonzero(counts < k)
            raise GraphError(
                f"sparse structure: fewer than {k} neighbours within {JARVIS_MAX_RADIUS:g} Å for "
                f"{len(sparse)} atom(s), e.g. atom {sparse[0]} ({structure[int(sparse[0])].specie})"
            )
        radius = min(2.0 * radius, JARVIS_MAX_RADIUS)


def _image_code(images: np.ndarray, span: int) -> np.ndarray:
    """[E, 3] integer images with |component| <= span // 2 → [E] distinct non-negative integers."""
    shifted = images + span // 2
    return (shifted[:, 0] * span + shifted[:, 1]) * span + shifted[:, 2]


def _jarvis_graph(structure, z: np.ndarray, config: GraphConfig) -> CrystalGraph:
    """The reference ALIGNN graph (``"jarvis"``): jarvis-tools' ``nearest_neighbor_edges`` with
    ``use_canonize=True``, then ``build_undirected_edgedata``, edge for edge, as jarvis builds it from an
    ``Atoms`` with fractional coordinates (Devi et al.'s JARVIS atoms dicts are fractional).

    1. Every atom i keeps each neighbour (j, image) with ``JARVIS_BOND_TOL < d <= d_k(i)``, d_k(i) its k-th
       smallest neighbour distance (``get_all_neighbors``, sorted, ``distances[k - 1]``).
    2. Each kept pair is canonised, (lower index, higher index, image of the higher), and the set of them
       deduplicated: a bond kept from either end is one bond.
    3. Each canonical bond becomes two directed edges, one each way, with jarvis's displacement vectors.

    Ties at d_k decide which members of a shell of equal distances are kept, so the distances are computed in
    jarvis's own arithmetic, to the bit: Cartesian coordinates from the lattice rounded to 5 decimals (jarvis's
    ``Lattice`` rounds it), periodic shifts ``np.dot(image, lattice)`` from the unrounded matrix
    (``Atoms.lattice_mat``), ``d = np.sum((shift + r_j - r_i) ** 2, axis=-1) ** 0.5``. A shell that straddles k
    is then cut exactly where jarvis cuts it: often not whole, as its members' distances differ in the last
    bits.

    Kept on purpose, as in ALIGNN's DGL graphs: a bond from an atom to its own periodic image is found as both
    (i, i, I) and (i, i, -I), which canonise differently, so each of its two directed edges appears twice.
    """
    k = config.max_neighbors
    centre, nbr, images, _ = _jarvis_candidates(structure, config)
    lattice = structure.lattice.matrix
    rounded = np.around(lattice, decimals=_JARVIS_LATTICE_DECIMALS)
    frac = structure.frac_coords
    cart = np.dot(frac, rounded)  # jarvis: Atoms.cart_coords = Lattice.cart_coords(frac)
    images = np.rint(images).astype(np.int64)

    # get_all_neighbors: coords = np.dot(image, matrix) + cart_coords, one image at a time (a matrix product over
    # all images rounds differently in ~10 % of them), d = np.sum((coords_j - cart_i) ** 2, axis=-1) ** 0.5
    span = 2 * int(np.abs(images).max(initial=0)) + 1  # images as one integer each, for fast np.unique
    _, first, inverse = np.unique(_image_code(images, span), return_index=True, return_inverse=True)
    shifts = np.array([np.dot(u, lattice) for u in images[first].astype(np.float64)]).reshape(-1, 3)
    dist = np.sum((shifts[inverse.reshape(-1)] + cart[nbr] - cart[centre]) ** 2, axis=-1) ** 0.5

    ok = dist > JARVIS_BOND_TOL
    centre, nbr, images, dist = centre[ok], nbr[ok], images[ok], dist[ok]
    order = np.lexsort((dist, centre))
    counts = np.bincount(centre, minlength=len(structure))
    kth = dist[order[np.cumsum(counts) - counts + k - 1]]  # every atom has >= k (see _jarvis_candidates)
    keep = dist <= kth[centre]
    centre, nbr, images = centre[keep], nbr[keep], images[keep]

    # canonical bonds: (lower, higher, image of higher relative to lower), each once
    swap = nbr < centre
    low, high = np.where(swap, nbr, centre), np.where(swap, centre, nbr)
    image = np.where(swap[:, None], -images, images)
    _, first = np.unique((low * len(structure) + high) * span**3 + _image_code(image, span), return_index=True)
    low, high, image = low[first], high[first], image[first]

    # build_undirected_edgedata: d = Lattice.cart_coords(frac[high] + image - frac[low]), the edge low → high
    # carries d and high → low carries -d. In ltc's flow (source = neighbour, vector = r_src - r_dst) these are
    # the edges high → low with vector d and low → high with -d.
    d = np.dot(frac[high] + image - frac[low], rounded)
    src, dst = np.concatenate([high, low]), np.concatenate([low, high])
    vectors = np.concatenate([d, -d])
    distances = np.linalg.norm(vectors, axis=1)
    # grouped by centre, nearest first, ties broken by the vector (the sort key of "knn")
    order = np.lexsort((distances + (vectors @ _TIE_DIRECTION) * _TIE_SCALE, dst))
    return CrystalGraph(
        z=z.astype(np.uint8),
        edge_index=np.stack([src[order], dst[order]]).astype(np.int32),
        distances=distances[order].astype(np.float32),
        vectors=vectors[order].astype(np.float32),
    )


@lru_cache(maxsize=4)
def _chgnet_converter(cutoff: float, bond_cutoff: float):
    from chgnet.graph import CrystalGraphConverter

    # isolated atoms are checked here, to reject them with ltc's reason
    return CrystalGraphConverter(
        atom_graph_cutoff=cutoff, bond_graph_cutoff=bond_cutoff, algorithm="fast", on_isolated_atoms="ignore"
    )


def _chgnet_graph(structure, z: np.ndarray, config: GraphConfig) -> CrystalGraph:
    """CHGNet's graph (``"chgnet"``), as its ``CrystalGraphConverter`` builds it, in ltc's arrays.

    The converter's directed edges (centre, neighbour, image), in its order, become ltc's edges (neighbour →
    centre, ``vectors = r_j + image - r_i`` in float64, then float32); its ``directed2undirected`` is kept, and
    its bond graph rows (atom, bond, directed edge, bond, directed edge) become ``angle_edges`` (the two directed
    edges): the atom is their common centre and the bonds follow from ``directed2undirected``, so nothing is lost.
    """
    if z.max() > CHGNET_MAX_Z:
        bad_z = int(z[z > CHGNET_MAX_Z][0])
        raise GraphError(f"element outside H..Pu: Z={bad_z} is not in CHGNet's atom embedding (1..{CHGNET_MAX_Z})")
    assert config.bond_cutoff is not None  # set by GraphConfig for "chgnet"
    g = _chgnet_converter(config.cutoff, config.bond_cutoff)(structure)
    n = len(structure)
    pairs = g.atom_graph.numpy().reshape(-1, 2).astype(np.int64)  # [E, 2] centre, neighbour
    counts = np.bincount(pairs[:, 0], minlength=n)
    if (counts == 0).any():
        lonely = np.flatnonzero(counts == 0)
        names = ", ".join(f"{i} ({structure[int(i)].specie})" for i in lonely[:5])
        more = f" and {len(lonely) - 5} more" if len(lonely) > 5 else ""
        raise GraphError(f"isolated atom: no neighbour within cutoff={config.cutoff} Å for atom {names}{more}")
    centre, nbr = pairs[:, 0], pairs[:, 1]
    images = g.neighbor_image.numpy().astype(np.float64)
    cart = structure.cart_coords
    vectors = cart[nbr] + images @ structure.lattice.matrix - cart[centre]
    bond_graph = g.bond_graph.numpy().reshape(-1, 5)
    return CrystalGraph(
        z=z.astype(np.uint8),
        edge_index=np.stack([nbr, centre]).astype(np.int32),
        distances=np.linalg.norm(vectors, axis=1).astype(np.float32),
        vectors=vectors.astype(np.float32),
        directed2undirected=g.directed2undirected.numpy().astype(np.int32),
        angle_edges=np.ascontiguousarray(bond_graph[:, [2, 4]], dtype=np.int32),
    )


@lru_cache(maxsize=1)
def cgcnn_atom_features() -> np.ndarray:
    """CGCNN's 92-dim one-hot atom features, as shipped by matminer: array [MAX_Z + 1, 92], row = Z.

    Row 0 is zeros (no element 0).
    """
    import matminer

    path = Path(matminer.__file__).parent / "utils" / "data_files" / "cgcnn_atom_feature.json"
    with open(path) as fh:
        table = json.load(fh)
    width = len(next(iter(table.values())))
    out = np.zeros((MAX_Z + 1, width), dtype=np.float32)
    for key, row in table.items():
        out[int(key)] = row
    return out
