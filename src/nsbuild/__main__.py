from nsbuild.cli import entry

entry()
