from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from ltc import datasets
from ltc.graphs import (
    JARVIS_BOND_TOL,
    MAX_Z,
    GraphConfig,
    GraphError,
    cgcnn_atom_features,
    structure_to_graph,
)

A_NACL = 5.64  # Å
A_CU = 3.61  # Å
JARVIS = GraphConfig(construction="jarvis")


@pytest.fixture(scope="module")
def nacl() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(A_NACL), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


@pytest.fixture(scope="module")
def real_structures() -> list[Structure]:
    """A few real, low-symmetry structures from the phonons set (6–12 atoms)."""
    recs = [r for r in datasets.read("ph").records if 6 <= len(r.payload["elements"]) <= 12][:6]
    return [datasets.parse_structure(r.fmt, r.payload) for r in recs]


def environments(structure: Structure, config: GraphConfig) -> list[tuple]:
    """Per atom: (Z, sorted neighbour (Z, rounded vector) pairs); a multiset invariant to cell choice."""
    g = structure_to_graph(structure, config=config)
    out = []
    for i in range(g.num_nodes):
        mask = g.edge_index[1] == i
        nbrs = sorted(
            (int(g.z[j]), *np.round(v, 3).tolist()) for j, v in zip(g.edge_index[0][mask], g.vectors[mask], strict=True)
        )
        out.append((int(g.z[i]), tuple(nbrs)))
    return sorted(out)


def test_rock_salt_first_shell(nacl):
    g = structure_to_graph(nacl, config=GraphConfig(cutoff=3.0, max_neighbors=12))
    assert g.num_nodes == 8  # conventional cell
    assert g.num_edges == 8 * 6
    np.testing.assert_allclose(g.distances, A_NACL / 2, atol=1e-5)
    # every neighbour of Na is Cl and vice versa
    assert (g.z[g.edge_index[0]] != g.z[g.edge_index[1]]).all()
    assert np.bincount(g.edge_index[1], minlength=8).tolist() == [6] * 8


def test_rock_salt_default_graph_keeps_12_nearest(nacl):
    g = structure_to_graph(nacl)  # 8 Å, 12 neighbours
    assert g.num_edges == 8 * 12
    for i in range(8):
        d = np.sort(g.distances[g.edge_index[1] == i])
        np.testing.assert_allclose(d[:6], A_NACL / 2, atol=1e-5)  # 6 Cl
        np.testing.assert_allclose(d[6:], A_NACL / np.sqrt(2), atol=1e-5)  # 6 of the 12 Na at a/sqrt2


@pytest.mark.parametrize("config", [GraphConfig(), JARVIS], ids=["knn", "jarvis"])  # chgnet: test_chgnet
def test_edges_are_consistent(real_structures, config):
    for s in real_structures:
        g = structure_to_graph(s, config=config)
        np.testing.assert_allclose(np.linalg.norm(g.vectors, axis=1), g.distances, rtol=1e-5)
        # grouped by centre, nearest first
        assert (np.diff(g.edge_index[1]) >= 0).all()
        for i in range(g.num_nodes):
            d = g.distances[g.edge_index[1] == i]
            assert (np.diff(d) >= -1e-6).all()
            assert len(d) <= 12 if config.construction == "knn" else len(d) >= 12
        assert g.z.tolist() == [site.specie.Z for site in s]
        assert g.edge_index.dtype == np.int32 and g.vectors.dtype == np.float32
        # vector = r_j + lattice image - r_i: its fractional form differs from the frac difference by integers
        frac = s.lattice.get_fractional_coords(g.vectors)
        delta = frac - (s.frac_coords[g.edge_index[0]] - s.frac_coords[g.edge_index[1]])
        np.testing.assert_allclose(delta, np.round(delta), atol=1e-4)


def test_matches_cgcnn_reference_neighbours(real_structures):
    # CGCNN's reference: get_all_neighbors, sort each atom's list by distance, keep the first k.
    for s in real_structures:
        g = structure_to_graph(s, config=GraphConfig(cutoff=6.0, max_neighbors=8))
        for i, nbrs in enumerate(s.get_all_neighbors(6.0)):
            ref = sorted(n.nn_distance for n in nbrs)[:8]
            np.testing.assert_allclose(np.sort(g.distances[g.edge_index[1] == i]), ref, atol=1e-5)


@pytest.mark.parametrize("config", [GraphConfig(), GraphConfig(cutoff=4.5, max_neighbors=12)])
def test_supercell_and_translation_keep_environments(nacl, real_structures, config):
    for s in [nacl, *real_structures[:3]]:
        ref = environments(s, config)
        sc = s * (2, 1, 2)
        assert environments(sc, config) == sorted(ref * 4)
        moved = s.copy()
        moved.translate_sites(range(len(moved)), [0.137, -0.291, 0.418], frac_coords=True, to_unit_cell=True)
        assert environments(moved, config) == ref


def test_graph_config_validation():
    assert GraphConfig(cutoff=5, max_neighbors=8).cutoff == 5.0
    # settings written before constructions existed mean "knn"
    assert GraphConfig(**{"cutoff": 8.0, "max_neighbors": 12}).construction == "knn"
    assert JARVIS.to_dict() == {"cutoff": 8.0, "max_neighbors": 12, "construction": "jarvis"}
    assert JARVIS.line_graph_backtracking and not GraphConfig().line_graph_backtracking
    for bad, match in [
        (dict(cutoff=0), "cutoff=0 must be a number > 0"),
        (dict(cutoff=-1.5), "cutoff=-1.5 must be"),
        (dict(cutoff="8"), "cutoff='8' must be"),
        (dict(max_neighbors=0), "max_neighbors=0 must be an integer >= 1"),
        (dict(max_neighbors=2.5), "max_neighbors=2.5 must be"),
        (dict(construction="alignn"), r"construction='alignn' must be one of \['knn', 'jarvis', 'chgnet'\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            GraphConfig(**bad)


def test_structures_that_cannot_become_graphs():
    lonely = Structure(Lattice.cubic(20.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    with pytest.raises(
        GraphError, match=r"isolated atom: no neighbour within cutoff=8.0 Å for atom 0 \(Na\), 1 \(Cl\)"
    ):
        structure_to_graph(lonely)
    assert structure_to_graph(lonely, config=GraphConfig(cutoff=20.5)).num_edges > 0

    with pytest.raises(GraphError, match="empty structure"):
        structure_to_graph(Structure(Lattice.cubic(4.0), [], []))

    alloy = Structure(Lattice.cubic(3.6), [{"Fe": 0.5, "Ni": 0.5}], [[0, 0, 0]])
    with pytest.raises(GraphError, match="disordered site: site 0"):
        structure_to_graph(alloy)


def test_cgcnn_features_are_matminers_table():
    import matminer

    table = cgcnn_atom_features()
    assert table.shape == (MAX_Z + 1, 92)
    assert not table[0].any()
    path = Path(matminer.__file__).parent / "utils/data_files/cgcnn_atom_feature.json"
    raw = json.loads(path.read_text())
    np.testing.assert_array_equal(table[8], raw["8"])
    np.testing.assert_array_equal(table[100], raw["100"])
    # 9 one-hot property groups (some elements lack a property); H..Ba all differ (CGCNN's own table
    # gives some lanthanides and actinides identical rows, e.g. La/Ce and Bk..Fm)
    assert set(np.unique(table)) == {0.0, 1.0}
    ones = table[1:].sum(axis=1)
    assert ones.max() == 9 and ones.min() >= 1
    assert len({row.tobytes() for row in table[1:57]}) == 56


def test_probe_radius_gives_exactly_the_full_cutoff_graph(real_structures, nacl, monkeypatch):
    import ltc.graphs as graphs

    # Layered 2D cells (vacuum) make the density-based probe too small, so the fallback runs too.
    twod = [datasets.parse_structure(r.fmt, r.payload) for r in datasets.read("jarvis2d").records[:8]]
    lonely = Structure(Lattice.cubic(20.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    configs = [GraphConfig(), GraphConfig(cutoff=5.0, max_neighbors=12), GraphConfig(cutoff=8.0, max_neighbors=4)]
    configs += [JARVIS, GraphConfig(cutoff=3.0, max_neighbors=12, construction="jarvis")]
    for config in configs:
        for s in [nacl, *real_structures, *twod, lonely]:
            monkeypatch.setattr(graphs, "PROBE_FACTOR", 2.0)
            try:
                fast = structure_to_graph(s, config=config)
            except GraphError as err:
                fast = str(err)
            monkeypatch.setattr(graphs, "PROBE_FACTOR", None)
            try:
                full = structure_to_graph(s, config=config)
            except GraphError as err:
                full = str(err)
            if isinstance(full, str):
                assert fast == full
                continue
            for a, b in zip(
                (fast.z, fast.edge_index, fast.distances, fast.vectors),
                (full.z, full.edge_index, full.distances, full.vectors),
                strict=True,
            ):
                np.testing.assert_array_equal(a, b)


# --- the reference construction ("jarvis"); tests/test_jarvis_reference.py checks it against jarvis-tools --------


def _edge_multiset(g, sign: float = 1.0) -> list[tuple]:
    """(centre, neighbour, vector rounded to 1e-4 Å) of every edge, sorted; ``sign=-1``: each edge reversed."""
    centre, nbr = (g.edge_index[1], g.edge_index[0]) if sign > 0 else (g.edge_index[0], g.edge_index[1])
    vectors = np.round(sign * g.vectors.astype(np.float64), 4) + 0.0  # + 0.0: no -0.0
    return sorted((int(i), int(j), *v.tolist()) for i, j, v in zip(centre, nbr, vectors, strict=True))


def test_jarvis_graph_is_undirected(real_structures, nacl):
    # every edge j → i with vector v has its reverse i → j with -v (as many times)
    for s in [nacl, *real_structures]:
        g = structure_to_graph(s, config=JARVIS)
        assert _edge_multiset(g) == _edge_multiset(g, sign=-1.0)


def test_jarvis_equals_knn_when_the_kth_neighbour_closes_a_shell(nacl):
    # rock salt, k = 6: the 6 Cl at a/2 are exactly the first shell (the next, 12 Na, is at a/sqrt2)
    knn = structure_to_graph(nacl, config=GraphConfig(cutoff=3.0, max_neighbors=6))
    ref = structure_to_graph(nacl, config=GraphConfig(cutoff=3.0, max_neighbors=6, construction="jarvis"))
    assert ref.num_edges == knn.num_edges == 8 * 6
    assert _edge_multiset(ref) == _edge_multiset(knn)


def test_jarvis_bonds_to_an_atoms_own_image_appear_twice():
    # fcc Cu, one atom per cell: its 12 nearest neighbours are all images of itself. jarvis canonises
    # (0, 0, I) and (0, 0, -I) as two bonds and writes each both ways: 24 edges, each vector twice.
    half = A_CU / 2
    cu = Structure(Lattice([[0, half, half], [half, 0, half], [half, half, 0]]), ["Cu"], [[0, 0, 0]])
    assert structure_to_graph(cu).num_edges == 12
    g = structure_to_graph(cu, config=JARVIS)
    assert g.num_edges == 24
    np.testing.assert_allclose(g.distances, A_CU / np.sqrt(2), rtol=1e-6)
    vectors, counts = np.unique(np.round(g.vectors, 4), axis=0, return_counts=True)
    assert len(vectors) == 12 and (counts == 2).all()


def test_jarvis_enlarges_the_cutoff_where_an_atom_has_fewer_than_k(nacl):
    # no neighbour within 2 Å: "knn" has nothing to keep; jarvis searches further and builds the same graph
    # as at 8 Å (its edges never depend on the cutoff)
    with pytest.raises(GraphError, match="isolated atom"):
        structure_to_graph(nacl, config=GraphConfig(cutoff=2.0))
    small = structure_to_graph(nacl, config=GraphConfig(cutoff=2.0, construction="jarvis"))
    full = structure_to_graph(nacl, config=JARVIS)
    for field in ("edge_index", "distances", "vectors"):
        np.testing.assert_array_equal(getattr(small, field), getattr(full, field))
    # two atoms in a 20 Å box: every neighbour lies beyond 8 Å, and each atom still gets >= 12
    lonely = Structure(Lattice.cubic(20.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    g = structure_to_graph(lonely, config=JARVIS)
    assert np.bincount(g.edge_index[1]).min() >= 12
    assert g.distances.min() == pytest.approx(10 * np.sqrt(3), rel=1e-6)
    # the search stops at JARVIS_MAX_RADIUS: beyond it a structure is a rejected row, not an endless search
    with pytest.raises(GraphError, match=r"sparse structure: fewer than 12 neighbours within 100 Å for 1 atom"):
        structure_to_graph(Structure(Lattice.cubic(150.0), ["Na"], [[0, 0, 0]]), config=JARVIS)


def test_jarvis_skips_pairs_closer_than_its_bond_tolerance():
    # jarvis's get_all_neighbors ignores pairs within bond_tol = 0.15 Å (overlapping sites)
    s = Structure(Lattice.cubic(4.0), ["Na", "Na"], [[0, 0, 0], [0.025, 0, 0]])  # 0.1 Å apart
    assert structure_to_graph(s).distances.min() == pytest.approx(0.1, rel=1e-5)
    g = structure_to_graph(s, config=JARVIS)
    assert g.distances.min() > JARVIS_BOND_TOL


@pytest.mark.parametrize("construction", ["knn", "chgnet"])
def test_a_graph_travels_as_bytes_and_comes_back_the_same(real_structures, construction):
    from ltc.graphs import CrystalGraph

    config = GraphConfig(cutoff=6.0, construction="chgnet") if construction == "chgnet" else GraphConfig()
    for structure in real_structures:
        g = structure_to_graph(structure, config=config)
        back = CrystalGraph.from_bytes(g.to_bytes())
        for name, value in vars(g).items():
            other = getattr(back, name)
            assert (value is None) == (other is None), name
            if value is not None:
                assert value.dtype == other.dtype and np.array_equal(value, other), name
    with pytest.raises(ValueError, match="a packed graph of"):
        CrystalGraph.from_bytes(g.to_bytes() + b"\0")


def test_an_unknown_element_is_a_rejected_graph_not_a_wild_atomic_number():
    poscar = "x\n1.0\n4 0 0\n0 4 0\n0 0 4\nXx Na\n1 1\ndirect\n0 0 0\n0.5 0.5 0.5\n"
    structure = Structure.from_str(poscar, fmt="poscar")  # pymatgen reads "Xx" as a dummy species
    with pytest.raises(GraphError, match="unknown element: site 0 is Xx"):
        structure_to_graph(structure)
