"""The mmacmix registries, and the suggestions made for a typo in a config.

``MODELS``, ``HOOKS`` and ``RUNNERS`` are children of MMEngine's root
registries: mmdet and mmseg configs reach our classes as
``type='mmacmix.ACmixResNet'`` (models), ``type='mmacmix.ExactResumeHook'``
(hooks) or ``runner_type='mmacmix.CheckedRunner'`` without either
package knowing about us, and ``locations`` imports the classes on first
use.

A name that is not registered gets the closest registered ones
(:func:`closest_types`), with the scope a config must write:
``mmacmix.ACmixResnet`` is answered "did you mean mmacmix.ACmixResNet?",
and so is an mmdet config's ``ACmixResNet``, whose scope is missing. Our
registries raise that message themselves, so mmdet's and mmseg's own tools
show it too; :func:`explain_build_error` (used by every command of
mmacmix, see :func:`mmacmix.cli.exit_on_error`) adds it to MMEngine's
"not in the registry" error for other scopes, and names the class and its
closest argument for an unknown constructor argument.
"""

import difflib
import inspect
import re
import sys
from collections.abc import Iterable, Iterator

from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import RUNNERS as MMENGINE_RUNNERS
from mmengine.registry import DefaultScope, Registry


def closest(word: str, choices: Iterable[str], limit: int = 3) -> list[str]:
    """The choices closest to ``word``, best first, ignoring case.

    A choice equal to ``word`` but for case is the only answer; else the
    choices that start with ``word`` (shortest first); else difflib's
    close matches (a ratio of at least 0.6).

    Args:
        word (str): What was typed.
        choices (Iterable[str]): What is accepted.
        limit (int): At most this many. Defaults to 3.

    Returns:
        list[str]: Close choices, best first; empty if none is close.
    """
    by_key: dict[str, list[str]] = {}
    for choice in choices:
        by_key.setdefault(choice.lower(), []).append(choice)
    key = word.lower()
    if key in by_key:
        return sorted(by_key[key])[:limit]
    keys = sorted((k for k in by_key if key and k.startswith(key)), key=len)
    if not keys:
        keys = difflib.get_close_matches(key, by_key, n=limit)
    found = [choice for k in keys for choice in sorted(by_key[k])]
    return found[:limit]


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``'; did you mean A or B?'``, or ``''`` if nothing is close."""
    found = closest(word, choices)
    if not found:
        return ''
    return '; did you mean ' + ' or '.join(found) + '?'


def _tree(registry: Registry) -> Iterator[Registry]:
    yield registry
    for child in list(registry.children.values()):
        yield from _tree(child)


def _root(registry: Registry) -> Registry:
    while registry.parent is not None:
        registry = registry.parent
    return registry


def type_names(registry: Registry, scope: str | None = None) -> list[str]:
    """Every type a config of ``scope`` can name in ``registry``'s tree.

    Names of the scope's registry and its ancestors as they are, those of
    other scopes (of imported packages only) with their scope, ours always
    with it: ``mmacmix.ACmixResNet`` is how configs name it.

    Args:
        registry (Registry): A registry of the tree (models, hooks...).
        scope (str, optional): The config's scope. Defaults to the
            current default scope, else ``registry``'s.
    """
    if scope is None:
        current = DefaultScope.get_current_instance()
        scope = current.scope_name if current is not None else registry.scope
    for node in list(_tree(_root(registry))):
        if node.scope in ('mmacmix', scope):
            node.import_from_location()  # classes register on import
    names = set()
    for node in _tree(_root(registry)):
        local = node.scope != 'mmacmix' and any(
            below.scope == scope for below in _tree(node)
        )
        for name in node.module_dict:
            names.add(name if local else f'{node.scope}.{name}')
    return sorted(names)


def closest_types(
    key: str, registry: Registry, scope: str | None = None
) -> list[str]:
    """The registered types closest to ``key`` (see :func:`type_names`).

    The scope is compared apart from the name: ``ACmixResnet`` and
    ``mmdet.ACmixResNet`` both find ``mmacmix.ACmixResNet``. A name of
    the config's own scope hides the same name in other scopes.
    """
    _, name = Registry.split_scope_key(key)
    by_name: dict[str, list[str]] = {}
    for full in type_names(registry, scope):
        by_name.setdefault(Registry.split_scope_key(full)[1], []).append(full)
    found = []
    for match in closest(name, by_name):
        shown = by_name[match]
        found += [match] if match in shown else shown
    return found[:3]


def unknown_type_message(
    key: str, registry: Registry, scope: str | None = None
) -> str:
    """``'X is not in the S::N registry; did you mean Y?'``."""
    found = closest_types(key, registry, scope)
    where = f'{key} is not in the {registry.scope}::{registry.name} registry'
    if found:
        return f'{where}; did you mean {" or ".join(found)}?'
    return (
        f'{where}, and no registered name is close to it; check the name, '
        "and that the config's custom_imports imports the package that "
        'registers it'
    )


class SuggestingRegistry(Registry):
    """A registry whose unknown names fail with the closest known ones.

    When MMEngine's builder asks for a name that is not registered,
    ``get`` raises ``KeyError`` with :func:`unknown_type_message` where
    MMEngine's returns None (which the builder turns into a ``KeyError``
    without a suggestion). Other callers still get None, and ``in``
    answers False.
    """

    def get(self, key: str):
        found = super().get(key)
        if found is None and _asked_by_a_build():
            scope, _ = self.split_scope_key(key)
            shown = key if scope else f'{self.scope}.{key}'
            raise KeyError(unknown_type_message(shown, self))
        return found


def _asked_by_a_build() -> bool:
    """Whether the registry look-up under way was made by MMEngine's
    ``build_from_cfg`` (which fails on None anyway), rather than by
    ``in`` or another caller that expects None for an unknown name."""
    frame = sys._getframe(2)  # the caller of SuggestingRegistry.get
    while frame is not None and frame.f_code.co_name == 'get':
        frame = frame.f_back  # parents ask their children through get
    return frame is not None and frame.f_code.co_name == 'build_from_cfg'


MODELS = SuggestingRegistry(
    'model',
    parent=MMENGINE_MODELS,
    scope='mmacmix',
    locations=['mmacmix.models'],
)
HOOKS = SuggestingRegistry(
    'hook',
    parent=MMENGINE_HOOKS,
    scope='mmacmix',
    locations=['mmacmix.apis.hooks'],
)
# runner_type='mmacmix.CheckedRunner': checkpoints loaded as tools/train.py
# loads them, for launchers that build the Runner themselves (mim train).
RUNNERS = SuggestingRegistry(
    'runner',
    parent=MMENGINE_RUNNERS,
    scope='mmacmix',
    locations=['mmacmix.apis.runner'],
)

# MMEngine's message for a name no registry of the scope holds.
_NOT_REGISTERED = re.compile(
    r'^(?P<key>\S+) is not in the (?P<scope>[\w.]+)::(?P<name>[\w ]+) '
    r'registry\. Please check'
)
_UNEXPECTED = re.compile(r"got an unexpected keyword argument '(\w+)'")
_MISSING = re.compile(r'missing \d+ required \w+(?:-\w+)? arguments?: (.+)$')


def explain_build_error(error: BaseException) -> str | None:
    """A one-line explanation of a config mistake found while building.

    * MMEngine's "X is not in the S::N registry" ``KeyError``: the same
      sentence with the closest registered names.
    * A ``TypeError`` from the constructor that a registry build called
      with the config's arguments (an argument it does not take, or one
      it needs and did not get): the type as the config names it
      (``mmacmix.ACmixResNet``, not an internal base class) and the
      closest arguments it takes.

    Args:
        error (BaseException): What the command raised.

    Returns:
        str | None: The message, or None if ``error`` is neither (a bug,
        whose traceback should be kept).
    """
    if isinstance(error, KeyError) and len(error.args) == 1:
        match = _NOT_REGISTERED.match(str(error.args[0]))
        registry = match and _find_registry(match['scope'], match['name'])
        if registry is not None:
            return unknown_type_message(match['key'], registry, registry.scope)
        return None
    if isinstance(error, TypeError):
        return _explain_arguments(error)
    return None


def _find_registry(scope: str, name: str) -> Registry | None:
    from mmengine.registry import root

    for value in vars(root).values():
        if isinstance(value, Registry):
            for node in _tree(value):
                if node.scope == scope and node.name == name:
                    return node
    return None


def _explain_arguments(error: TypeError) -> str | None:
    build = _failed_build(error)
    if build is None:
        return None
    kind, built, args = build
    name = kind if isinstance(kind, str) else built.__name__
    accepted = accepted_arguments(built)
    if accepted is None:
        return None
    message = str(error)
    unexpected = _UNEXPECTED.search(message)
    if unexpected:
        word = unexpected.group(1)
        if word not in args or word in accepted:
            return None  # not the config's argument: a bug
        hint = did_you_mean(word, accepted) or (
            '; it takes ' + ', '.join(accepted)
        )
        return f'{name} has no argument {word!r}{hint}'
    missing = _MISSING.search(message)
    words = re.findall(r"'(\w+)'", missing.group(1)) if missing else []
    if words and all(w in accepted and w not in args for w in words):
        listed = ', '.join(repr(word) for word in words)
        return f'{name} needs {listed}, which the config does not give'
    return None


def _failed_build(error: BaseException) -> tuple | None:
    """``(type, class, arguments)`` of the innermost MMEngine build that
    ``error`` came from, if the class's constructor itself refused the
    arguments: nothing ran below it but the ``__init__`` methods of the
    class and its bases, which it hands ``**kwargs`` to."""
    found = None
    trace = error.__traceback__
    while trace is not None:
        code = trace.tb_frame.f_code
        if code.co_name == 'build_from_cfg' and code.co_filename.endswith(
            'build_functions.py'
        ):
            found = trace
        trace = trace.tb_next
    if found is None:
        return None
    local = found.tb_frame.f_locals
    built = local.get('obj_cls')
    if inspect.isclass(built):
        own = [c.__dict__.get('__init__') for c in built.__mro__]
    elif inspect.isfunction(built):
        own = [built]
    else:
        return None
    codes = {getattr(f, '__code__', None) for f in own} - {None}
    trace = found.tb_next
    while trace is not None:
        if trace.tb_frame.f_code not in codes:
            return None
        trace = trace.tb_next
    return local.get('obj_type'), built, local.get('args') or {}


def accepted_arguments(built) -> list[str] | None:
    """The keyword arguments a class (or function) takes, following
    ``**kwargs`` to the base classes it is handed to.

    Returns:
        list[str] | None: The names, or None if they cannot be known.
    """
    names: list[str] = []
    if inspect.isclass(built):
        mro = built.__mro__
        callables = [
            c.__dict__['__init__'] for c in mro if '__init__' in c.__dict__
        ]
    else:
        callables = [built]
    for function in callables:
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            return None
        more = False
        for parameter in parameters:
            if parameter.kind is parameter.VAR_KEYWORD:
                more = True
            elif parameter.kind in (
                parameter.POSITIONAL_OR_KEYWORD,
                parameter.KEYWORD_ONLY,
            ) and parameter.name not in ('self', *names):
                names.append(parameter.name)
        if not more:
            return names
    return names
