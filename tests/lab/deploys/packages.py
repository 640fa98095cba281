"""Lab test deploy: install the build toolchain from the lab's Debian mirror, first finishing any package
installation that a dropped connection interrupted (pyinfra's apt operations do not: apt refuses with
"dpkg was interrupted, you must manually run 'dpkg --configure -a'")."""

from pyinfra import host
from pyinfra.api import FactBase
from pyinfra.operations import apt, server


class InterruptedPackageInstall(FactBase):
    """True when dpkg left work unfinished (pending journal entries or half-installed packages)."""

    command = "find /var/lib/dpkg/updates -type f | head -n 1; dpkg --audit || true"

    def process(self, output: list[str]) -> bool:
        return any(line.strip() for line in output)


if host.get_fact(InterruptedPackageInstall):
    server.shell(
        name="Finish the package installation a dropped connection interrupted",
        commands=["DEBIAN_FRONTEND=noninteractive dpkg --configure -a",
                  "DEBIAN_FRONTEND=noninteractive apt-get -y -f install"],
    )
apt.update(name="Refresh package lists", cache_time=3600)
apt.packages(name="Install the build toolchain", packages=["build-essential", "git", "python3-dev"])
