"""scrapy-polite: politeness, caching and CPU offloading for Scrapy, in one add-on."""

from scrapy_polite._settings import PoliteSettingError
from scrapy_polite.addon import Addon

__version__ = "0.1.0"

__all__ = ["Addon", "PoliteSettingError", "__version__"]
