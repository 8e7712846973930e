"""lorafleet.scheduler"""
