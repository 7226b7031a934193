"""The transparency page's words in each language it speaks (en, de, fr)."""

from __future__ import annotations

__all__ = ["LANGUAGES", "MESSAGES"]

LANGUAGES = ("en", "de", "fr")

MESSAGES: dict[str, dict[str, str]] = {
    "en": {
        "title": "Blocking on this network: transparency",
        "intro": "This network blocks access to addresses on the lists below, as the "
                 "authorities named there require. This page shows what is enforced, "
                 "how often, and how anyone can check the node's tamper-evident log. "
                 "It contains no information about any person or any blocked address.",
        "node": "Node", "operator": "Operated by", "generated": "As of",
        "lists": "Lists in force", "version": "version", "issuer": "Issued by",
        "legal_basis": "Legal basis", "entries": "Entries", "domain": "whole sites",
        "url": "single pages", "categories": "By category", "published": "Published",
        "expires": "Expires", "expired": "expired", "key": "Signing key id",
        "appeal": "To appeal a block", "hotline": "To report abuse material",
        "contact": "Contact", "none": "none",
        "held": "Updates held for review",
        "held_text": "A new version of a list that changed unusually is held until an "
                     "operator confirms or rejects it; the version in force stays.",
        "held_item": "held since", "no_held": "No update is held.",
        "blocks": "Blocks per day", "blocks_text": "Aggregate counts per list and "
                  "category; never per person, never a name or address.",
        "day": "Day", "list": "List", "category": "Category", "count": "Blocks",
        "no_blocks": "No blocks recorded in this period.",
        "partial": "Counting is still catching up with the log: the figures are incomplete.",
        "checkpoint": "Latest signed checkpoint of the audit log",
        "size": "Events", "created": "Signed", "cosignatures": "Witness cosignatures",
        "no_checkpoint": "No checkpoint yet.",
        "verify": "How to verify", "verify_text": "Anyone can follow this node's log and "
                  "check that it only grows, with netfilter's own commands:",
        "node_key": "Node key (save it as NODE.pub)",
        "json": "The same information as JSON",
    },
    "de": {
        "title": "Sperrungen in diesem Netz: Transparenz",
        "intro": "Dieses Netz sperrt den Zugang zu Adressen auf den unten genannten "
                 "Listen, wie es die dort genannten Behörden verlangen. Diese Seite zeigt, "
                 "was durchgesetzt wird, wie oft, und wie jede Person das manipulationssichere "
                 "Protokoll des Knotens prüfen kann. Sie enthält keine Angaben zu Personen "
                 "oder gesperrten Adressen.",
        "node": "Knoten", "operator": "Betrieben von", "generated": "Stand",
        "lists": "Geltende Listen", "version": "Version", "issuer": "Herausgegeben von",
        "legal_basis": "Rechtsgrundlage", "entries": "Einträge", "domain": "ganze Websites",
        "url": "einzelne Seiten", "categories": "Nach Kategorie",
        "published": "Veröffentlicht", "expires": "Gültig bis", "expired": "abgelaufen",
        "key": "Kennung des Signaturschlüssels",
        "appeal": "Widerspruch gegen eine Sperrung", "hotline": "Missbrauchsdarstellungen melden",
        "contact": "Kontakt", "none": "keine",
        "held": "Zur Prüfung zurückgehaltene Aktualisierungen",
        "held_text": "Eine neue Listenversion mit ungewöhnlichen Änderungen wird "
                     "zurückgehalten, bis ein Betreiber sie bestätigt oder ablehnt; die "
                     "geltende Version bleibt in Kraft.",
        "held_item": "zurückgehalten seit", "no_held": "Keine Aktualisierung wird zurückgehalten.",
        "blocks": "Sperrungen pro Tag", "blocks_text": "Summen je Liste und Kategorie; "
                  "niemals pro Person, niemals ein Name oder eine Adresse.",
        "day": "Tag", "list": "Liste", "category": "Kategorie", "count": "Sperrungen",
        "no_blocks": "In diesem Zeitraum wurden keine Sperrungen verzeichnet.",
        "partial": "Die Zählung holt das Protokoll noch ein: die Zahlen sind unvollständig.",
        "checkpoint": "Letzter signierter Prüfpunkt des Protokolls",
        "size": "Ereignisse", "created": "Signiert", "cosignatures": "Gegenzeichnungen von Zeugen",
        "no_checkpoint": "Noch kein Prüfpunkt.",
        "verify": "So prüfen Sie", "verify_text": "Jede Person kann das Protokoll dieses "
                  "Knotens verfolgen und prüfen, dass es nur wächst, mit den Befehlen von "
                  "netfilter:",
        "node_key": "Schlüssel des Knotens (als NODE.pub speichern)",
        "json": "Dieselben Angaben als JSON",
    },
    "fr": {
        "title": "Blocages sur ce réseau : transparence",
        "intro": "Ce réseau bloque l'accès aux adresses figurant sur les listes ci-dessous, "
                 "comme l'exigent les autorités qui y sont nommées. Cette page indique ce "
                 "qui est appliqué, à quelle fréquence, et comment chacun peut vérifier le "
                 "journal infalsifiable du nœud. Elle ne contient aucune information sur "
                 "une personne ni sur une adresse bloquée.",
        "node": "Nœud", "operator": "Exploité par", "generated": "État au",
        "lists": "Listes en vigueur", "version": "version", "issuer": "Émise par",
        "legal_basis": "Base légale", "entries": "Entrées", "domain": "sites entiers",
        "url": "pages isolées", "categories": "Par catégorie", "published": "Publiée le",
        "expires": "Expire le", "expired": "expirée", "key": "Identifiant de la clé de signature",
        "appeal": "Contester un blocage", "hotline": "Signaler des contenus d'abus",
        "contact": "Contact", "none": "aucune",
        "held": "Mises à jour retenues pour examen",
        "held_text": "Une nouvelle version de liste aux changements inhabituels est retenue "
                     "jusqu'à ce qu'un opérateur la confirme ou la rejette ; la version en "
                     "vigueur reste appliquée.",
        "held_item": "retenue depuis", "no_held": "Aucune mise à jour n'est retenue.",
        "blocks": "Blocages par jour", "blocks_text": "Totaux par liste et catégorie ; "
                  "jamais par personne, jamais un nom ni une adresse.",
        "day": "Jour", "list": "Liste", "category": "Catégorie", "count": "Blocages",
        "no_blocks": "Aucun blocage enregistré sur cette période.",
        "partial": "Le décompte rattrape encore le journal : les chiffres sont incomplets.",
        "checkpoint": "Dernier point de contrôle signé du journal",
        "size": "Événements", "created": "Signé le", "cosignatures": "Cosignatures des témoins",
        "no_checkpoint": "Pas encore de point de contrôle.",
        "verify": "Comment vérifier", "verify_text": "Chacun peut suivre le journal de ce "
                  "nœud et vérifier qu'il ne fait que croître, avec les commandes de netfilter :",
        "node_key": "Clé du nœud (à enregistrer sous NODE.pub)",
        "json": "Les mêmes informations en JSON",
    },
}
