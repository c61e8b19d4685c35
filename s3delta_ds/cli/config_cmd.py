"""``s3delta config``: print a complete, commented run config to start from.

s3delta config --defaults                  # every key, its default and what it does
s3delta config sst2 > my.yaml              # the same, set up for a registered task
s3delta config custom > my.yaml            # your own CSV/JSONL data: fill in files, columns, words
s3delta config examples/tiny_t5.yaml       # an existing config, completed and commented
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

_CUSTOM = [
    "data.task=custom",
    "data.train_file=train.csv",
    "data.validation_file=validation.csv",
    "data.template=review: {text}",
    "data.label_column=label",
    "data.label_words=[negative, positive]",
]


def register(sub) -> None:
    p = sub.add_parser("config", help="print a complete, commented run config (YAML) to start from")
    p.add_argument("what", nargs="?", help="a task name, 'custom', or a YAML config to complete")
    p.add_argument("--defaults", action="store_true", help="the defaults of every key")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p.set_defaults(func=run)


def config_text(what: str | None, overrides: list[str]) -> str:
    """The commented YAML for ``what`` (None: the defaults). Validated like a run's config."""
    from ..config import load_run_config
    from ..config_yaml import commented_yaml
    from ..data import get_task

    head = "s3delta_ds run config: run it with `s3delta search --config THIS.yaml` (any key can be overridden "
    head += "as section.key=value); every key is documented in s3delta_ds/config.py."
    if what is None:
        return commented_yaml(load_run_config(None, overrides), head)
    if what.endswith((".yaml", ".yml")) or Path(what).is_file():
        return commented_yaml(load_run_config(what, overrides), f"{head} Completed from {what}.")
    if what == "custom":
        cfg = load_run_config(None, [*_CUSTOM, *overrides])
        return commented_yaml(cfg, f"{head} Your own data: docs/your-data.md.")
    get_task(what)  # a misspelt name is an error that lists the tasks
    return commented_yaml(load_run_config(None, [f"data.task={what}", *overrides]), head)


def run(args) -> int:
    what, overrides = args.what, list(args.overrides)
    if what is not None and "=" in what and not Path(what).is_file():  # only overrides: of the defaults
        what, overrides = None, [what, *overrides]
    if args.defaults and what:
        raise ConfigError("pass either --defaults or a task/config, not both")
    print(config_text(what, overrides), end="")
    return 0
