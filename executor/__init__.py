"""lorafleet.executor"""
