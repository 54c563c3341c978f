"""Debiasing methods, one module each: `fit(access, data, criterion, budget, **options)`."""
