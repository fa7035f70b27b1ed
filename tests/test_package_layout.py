"""The package's layering, read from the source: one folder a role, imports only downward
between the folders (FOLDER_IMPORTS), no library module importing a command, no import cycle
between the modules, and no module reaching into another's private (underscore) names."""

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


def _is_main_guard(node: ast.AST) -> bool:
    """`if __name__ == '__main__':`, the block that runs only when the module is a command."""
    return isinstance(node, ast.If) and isinstance(node.test, ast.Compare) \
        and isinstance(node.test.left, ast.Name) and node.test.left.id == '__name__'


def _nodes_outside_main_guard(tree: ast.AST):
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(child for child in ast.iter_child_nodes(node) if not _is_main_guard(child))


def imported_names(tree: ast.AST):
    """(module imported, name taken from it or None, the local alias) for every import of the
    package, at any depth (a function-level import counts as much as a module-level one), except
    inside `if __name__ == '__main__':`, which runs only when the module itself is the command."""
    for node in _nodes_outside_main_guard(tree):
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


# Each folder of the package is one role; a folder may import itself and the folders listed.
# The method and the models stand on the settings' vocabulary only, the data and the runtime on
# nothing of the package; evaluation reads what training writes (through the runtime) and
# never imports training; training evaluates periodically through evaluation.
FOLDER_IMPORTS = {
    'settings': set(),
    'method': {'settings'},
    'models': {'settings'},
    'data': set(),
    'runtime': set(),
    'evaluation': {'settings', 'method', 'models', 'data', 'runtime'},
    'training': {'settings', 'method', 'models', 'data', 'runtime', 'evaluation'},
    'pytorch': {'settings', 'method', 'models', 'data', 'runtime', 'training'},
    'experiments': {'settings', 'method', 'models', 'data', 'runtime', 'evaluation', 'training',
                    'pytorch'},
}
# The modules outside every folder: the package itself and the training command.
TOP_LEVEL = {'alignmix_jax', 'alignmix_jax.main'}
# The commands (`python -m ...`): entry points that parse flags, which no library module
# (outside experiments/) imports. A command's own `if __name__ == '__main__':` block may import
# another command (the evaluation kinds run through evaluation.command).
COMMANDS = {'alignmix_jax.main', 'alignmix_jax.evaluation.__main__',
            'alignmix_jax.evaluation.command', 'alignmix_jax.experiments.reproduce',
            'alignmix_jax.experiments.bench', 'alignmix_jax.experiments.visualize',
            'alignmix_jax.pytorch.parity_run', 'alignmix_jax.pytorch.convert_torchvision',
            'alignmix_jax.data.prepare_tiny_imagenet', 'alignmix_jax.data.demo.build'}


def folder_of(name: str) -> str | None:
    """The role folder of module `name` (alignmix_jax.<folder>...), None at the top level."""
    parts = name.split('.')
    return parts[1] if len(parts) > 1 and parts[1] in FOLDER_IMPORTS else None


def calls_app_run(tree: ast.AST) -> bool:
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
               and node.func.attr == 'run' and isinstance(node.func.value, ast.Name)
               and node.func.value.id == 'app' for node in ast.walk(tree))


def test_every_module_lives_in_a_role_folder():
    assert sorted(name for name in MODULES if folder_of(name) is None) == sorted(TOP_LEVEL)
    assert set(FOLDER_IMPORTS) == {path.name for path in PACKAGE_ROOT.iterdir()
                                   if (path / '__init__.py').is_file()}


def wrong_imports(name: str, imported: set[str]) -> list[str]:
    """The modules of `imported` that module `name` may not import by FOLDER_IMPORTS."""
    folder = folder_of(name)
    if folder is None:
        return []  # the package and main may import any folder
    allowed = FOLDER_IMPORTS[folder] | {folder}
    return sorted(module for module in imported if module == 'alignmix_jax.main'
                  or (module not in TOP_LEVEL and folder_of(module) not in allowed))


@pytest.mark.parametrize('name', sorted(MODULES))
def test_imports_between_folders_go_only_downward(name):
    imported, _ = dependencies(name)
    assert wrong_imports(name, imported) == []


def test_the_folder_rule_refuses_an_upward_import():
    # The method importing training, the settings importing evaluation (as the check of
    # train.evals did before the kinds moved to config_choices), evaluation importing training.
    assert wrong_imports('alignmix_jax.method.mixup', {'alignmix_jax.training.train',
                                                       'alignmix_jax.method.alignment'}) \
        == ['alignmix_jax.training.train']
    assert wrong_imports('alignmix_jax.settings.config_checks', {'alignmix_jax.evaluation'}) \
        == ['alignmix_jax.evaluation']
    assert wrong_imports('alignmix_jax.evaluation.common',
                         {'alignmix_jax.training.train_step', 'alignmix_jax.runtime.sharding'}) \
        == ['alignmix_jax.training.train_step']
    assert wrong_imports('alignmix_jax.main', {'alignmix_jax.training.train'}) == []


def test_every_command_is_listed_and_no_module_imports_one():
    runners = {name for name, path in MODULES.items()
               if calls_app_run(ast.parse(path.read_text()))}
    assert runners <= COMMANDS, f'commands not listed: {sorted(runners - COMMANDS)}'
    # The experiments' commands are built of their own modules and of the evaluation command's
    # work as a function (evaluation.command.evaluate_workdir); below them, nothing imports one.
    for name in MODULES:
        if folder_of(name) == 'experiments':
            continue
        imported, _ = dependencies(name)
        assert not (imported & COMMANDS), f'{name} imports the command(s) {imported & COMMANDS}'


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    # A diamond is not a cycle.
    assert find_cycle({'a': {'b', 'c'}, 'b': {'d'}, 'c': {'d'}, 'd': set()}) is None


def test_the_walk_sees_the_package_and_its_imports():
    assert {'alignmix_jax.training.train', 'alignmix_jax.data.common', 'alignmix_jax.models.layers',
            'alignmix_jax.evaluation.command'} <= set(MODULES)
    imported, _ = dependencies('alignmix_jax.training.train')
    assert {'alignmix_jax.training.train_step', 'alignmix_jax.evaluation.classification',
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
