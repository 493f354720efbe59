"""YAML-described guests: the schema, validation with `file:line: key:` errors, and `build_machine`.

    from minivmm.config import load_config, build_machine
    config = load_config("configs/hello_long.yaml", overrides=["machine.memory=4M"])
    with build_machine(config, capture_console=True) as machine:
        result = machine.run_config()

The package re-exports what the rest of minivmm, the tests and the README use;
the work is split by job:

- `schema`: the typed result (`Config` and its parts), `SCHEMA` (a summary of
  the keys, with the meaning of the less obvious ones in its docstring) and
  `ConfigError`; `rule_types`: the typed rules inside it (loaded with the first
  config that has one).
- `validate`: located nodes, `--set` overrides, and the checks and conversions
  that make a `Config` (`load_config`, `parse_config`); `yamltree`: YAML text
  to located nodes (the one module importing PyYAML); `treecache`: the nodes of
  each config file, kept on disk while its text is unchanged.
- `build`: a `Config` to a running `ConfiguredMachine` (`build_machine`), the
  VM-free `check_config`, and `check_expectation` for a run's result.
- `rules`: the compilers that turn each YAML rule into an exit handler or an
  EPT callback.
"""
from .build import build_machine, check_config, check_expectation
from .schema import Config, ConfigError, FuzzConfig, SymbolRef
from .validate import load_config, parse_config

__all__ = ["Config", "ConfigError", "FuzzConfig", "SymbolRef", "build_machine", "check_config",
           "check_expectation", "load_config", "parse_config"]
