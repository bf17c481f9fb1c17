"""Analysis: parameter counts, module-tree profiles, comparison tables, diagrams, plots and the HTML report."""
