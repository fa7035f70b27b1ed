"""The package's layering, read from the source: no import cycle between its modules, and no
module reaching into another's private (underscore) names."""

import ast
import pathlib

import pytest

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[1] / 'alignmix_jax'
MAX_MODULE_LINES = 400


def module_files() -> dict[str, pathlib.Path]:
    """Dotted module name -> its file, for every module and package of alignmix_jax."""
    modules = {}
    for path in sorted(PACKAGE_ROOT.rglob('*.py')):
        parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix('').parts
        if parts[-1] == '__init__':
            parts = parts[:-1]
        modules['.'.join(parts)] = path
    return modules


MODULES = module_files()


def imported_names(tree: ast.AST):
    """(module imported, name taken from it or None, the local alias) for every import of the
    package, at any depth (a function-level import counts as much as a module-level one)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith('alignmix_jax'):
                    yield alias.name, None, alias.asname
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.startswith('alignmix_jax'):
            for alias in node.names:
                yield node.module, alias.name, alias.asname or alias.name


def dependencies(name: str) -> tuple[set[str], list[str]]:
    """The package modules `name` imports, and the private names it takes from them."""
    tree = ast.parse(MODULES[name].read_text())
    imported, private, aliases = set(), [], {}
    for module, taken, local in imported_names(tree):
        submodule = f'{module}.{taken}' if taken else None
        if submodule in MODULES:  # `from alignmix_jax.data import common`: the module common
            imported.add(submodule)
            aliases[local] = submodule
            continue
        imported.add(module)
        if taken is None:
            aliases[local or module.split('.')[0]] = module
        elif taken.startswith('_'):
            private.append(f'{module}.{taken}')
    for node in ast.walk(tree):
        # `data_common._helper`: a private attribute of an imported package module.
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in aliases and node.attr.startswith('_') \
                and not node.attr.startswith('__'):
            private.append(f'{aliases[node.value.id]}.{node.attr}')
    imported.discard(name)
    return imported & set(MODULES), private


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a path [a, b, ..., a], or None (iterative DFS)."""
    state = dict.fromkeys(graph, 0)  # 0 unvisited, 1 on the current path, 2 done
    for root in sorted(graph):
        if state[root]:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            successor = next(stack[-1], None)
            if successor is None:
                state[path.pop()] = 2
                stack.pop()
            elif state[successor] == 1:
                return path[path.index(successor):] + [successor]
            elif state[successor] == 0:
                state[successor] = 1
                path.append(successor)
                stack.append(iter(sorted(graph[successor])))
    return None


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    # A diamond is not a cycle.
    assert find_cycle({'a': {'b', 'c'}, 'b': {'d'}, 'c': {'d'}, 'd': set()}) is None


def test_the_walk_sees_the_package_and_its_imports():
    assert {'alignmix_jax.train', 'alignmix_jax.data.common', 'alignmix_jax.models.layers',
            'alignmix_jax.evaluation.command'} <= set(MODULES)
    imported, _ = dependencies('alignmix_jax.train')
    assert {'alignmix_jax.train_step', 'alignmix_jax.evaluation.classification',
            'alignmix_jax.data'} <= imported


def test_no_import_cycle_between_the_package_modules():
    graph = {name: dependencies(name)[0] for name in MODULES}
    cycle = find_cycle(graph)
    assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


@pytest.mark.parametrize('name', sorted(MODULES))
def test_no_module_imports_another_modules_private_names(name):
    _, private = dependencies(name)
    assert private == []


def test_each_data_source_imports_only_the_shared_data_module():
    for source in ('in_memory', 'imagenet', 'cub'):
        imported, _ = dependencies(f'alignmix_jax.data.{source}')
        # ImageNet's per-image transforms are a part of that source in a file of their own.
        imported.discard('alignmix_jax.data.imagenet_transforms')
        assert imported == {'alignmix_jax.data.common'}, source


@pytest.mark.parametrize('name', sorted(MODULES))
def test_no_module_is_much_longer_than_400_lines(name):
    # "~400": a little slack for a docstring, none for a second job.
    assert len(MODULES[name].read_text().splitlines()) <= MAX_MODULE_LINES + 20
