"""The package's modules import each other without a cycle, lazy imports inside functions included, and
the data code depends on no engine module."""
import ast
import os
import os.path as osp

from smmcl.config import REPO_ROOT

PACKAGE = osp.join(REPO_ROOT, 'smmcl')


def module_name(path: str) -> str:
    rel = osp.relpath(path, REPO_ROOT)[:-3].replace(os.sep, '.')
    return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def imports_of(path: str, modules) -> set:
    """The smmcl modules ``path`` imports anywhere in its body (top level and inside functions)."""
    name = module_name(path)
    package = name if path.endswith('__init__.py') else name.rsplit('.', 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = package.split('.')
                base = '.'.join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f'{base}.{alias.name}' for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def graph():
    """{module: the smmcl modules it imports}, with the packages Python runs first: importing a.b.c
    runs a/__init__ and a/b/__init__ (but a module's own packages are already running)."""
    paths = [osp.join(d, f) for d, _, files in os.walk(PACKAGE) for f in files if f.endswith('.py')]
    modules = {module_name(p) for p in paths}
    edges = {}
    for path in paths:
        name = module_name(path)
        own = {'.'.join(name.split('.')[:i]) for i in range(1, name.count('.') + 1)}
        targets = set()
        for target in imports_of(path, modules):
            parts = target.split('.')
            targets.update('.'.join(parts[:i]) for i in range(1, len(parts) + 1))
        edges[name] = {t for t in targets if t in modules and t not in own and t != name}
    return edges


def find_cycle(edges):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = 'open'
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 'open':
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 'done'
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(graph())
    assert cycle is None, ' -> '.join(cycle)


def test_the_finder_sees_a_cycle():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_data_code_imports_no_engine_module():
    edges = graph()
    for module, targets in edges.items():
        if module.startswith('smmcl.data'):
            assert not [t for t in targets if t.startswith('smmcl.engine')], module


def test_no_function_over_50_lines():
    """Short functions: base_config (the one place of defaults, a list) and Triton kernels excepted."""
    long = []
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith('.py'):
                continue
            path = osp.join(folder, name)
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != 'base_config':
                    kernel = any('jit' in ast.unparse(d) for d in node.decorator_list)
                    if not kernel and node.end_lineno - node.lineno + 1 > 50:
                        long.append(f'{module_name(path)}.{node.name}')
    assert long == []
