"""Data: where slices come from and what is true of them before a model sees them.

Sources (folder, archive, URL, listing, DICOM tree, the synthetic default: `sources`,
`archives`, `downloads`, `listing`, `synthetic`, `anatomy`) become a manifest (`intake`);
copies are found (`dedup`), slices are grouped into series (`grouping`, `similarity`) and
split (`splitting`), and the checks of validate (`validation`, `checks`, `check_report`,
`content_checks`, `shortcuts`, `acquisition`) say what is wrong with them. Data imports
imaging and the core modules, never model or evaluation.
"""
