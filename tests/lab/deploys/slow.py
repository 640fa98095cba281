"""Lab test deploy with one long step whose success stamp is written only after it finishes, so a connection
cut in the middle leaves the host without the stamp and the next run redoes the step."""

from pyinfra import host
from pyinfra.facts.files import File
from pyinfra.operations import files, server

work = "/var/lib/gpufleet-lab-test"
stamp = f"{work}/payload.done"
SLOW_SECONDS = 10  # long enough for the test to find and kill the session mid-step

files.directory(name="Create the work directory", path=work)
if host.get_fact(File, path=stamp) is None:
    server.shell(
        name="Unpack the payload (slow; stamped only on success)",
        commands=[(f"rm -f {work}/payload {stamp} && echo partial > {work}/payload && sleep {SLOW_SECONDS} "
                   f"&& echo complete > {work}/payload && touch {stamp}")],
    )
