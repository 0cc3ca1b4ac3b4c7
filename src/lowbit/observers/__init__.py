"""lowbit.observers"""
