"""The applications that score runs: `condlora eval` (`evaluate`), `experiment` (`experiment`,
`experiment_file`, `report`, `diagnostics`) and `quickstart` (`quickstart`), with their
commands (`cli`). Import from the modules; nothing is imported here, so the command line
starts fast."""
